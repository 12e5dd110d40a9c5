"""The demo job: tiny offline models -> build pipeline -> RankDPO training -> evaluation, under one work directory."""
from __future__ import annotations

import logging
from importlib import resources
from typing import Any, Optional

import yaml

from .tiny_models import save_demo_models

log = logging.getLogger("synpref.demo")

DEMO_PREFIX = "out/demo"


def rebase(node: Any, old: str, new: str) -> Any:
    """Replace a leading ``old`` path prefix in every string of a nested config."""
    if isinstance(node, dict):
        return {k: rebase(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [rebase(v, old, new) for v in node]
    if isinstance(node, str) and (node == old or node.startswith(old + "/")):
        return new.rstrip("/") + node[len(old):]
    return node


def demo_config(name: str, workdir: str) -> dict:
    """A packaged demo config (jobs/<name>) with its out/demo paths moved under ``workdir``."""
    data = yaml.safe_load(resources.files("synpref.jobs").joinpath(name).read_text())
    return rebase(data, DEMO_PREFIX, workdir)


def run_demo(workdir: str = DEMO_PREFIX, num_prompts: Optional[int] = 64, train_steps: Optional[int] = None,
             pipeline_args: Optional[list[str]] = None, build_overrides: Optional[dict] = None) -> dict[str, Any]:
    from ..pipelines.build_preferences import build
    from ..schemas.config import build_config_from_dict
    from ..schemas.loading import apply_overrides
    from ..training.config import TrainConfig
    from ..training.train import train

    log.info("demo: writing tiny random models under %s/models", workdir)
    save_demo_models(f"{workdir}/models")
    build_data = demo_config("demo_build.yaml", workdir)
    build_data["prompts"]["num_prompts"] = num_prompts
    cfg = build_config_from_dict(apply_overrides(build_data, build_overrides))
    log.info("demo: building preferences for %s prompts into %s", num_prompts, cfg.output.output_dir)
    built = build(cfg, pipeline_args)
    if built["summary"]["problems"]:
        log.error("demo: the build has problems; not training")
        return {"build": built, "train": None, "evaluate": None}
    train_data = demo_config("demo_train.yaml", workdir)
    if train_steps is not None:
        train_data["max_steps"] = train_steps
    log.info("demo: training RankDPO LoRA for %s steps", train_data.get("max_steps"))
    trained = train(TrainConfig.from_dict(train_data))
    from ..pipelines.evaluate import evaluate
    from ..schemas.eval_config import eval_config_from_dict

    eval_data = demo_config("demo_eval.yaml", workdir)
    eval_data["prompts"]["num_prompts"] = num_prompts
    eval_cfg = eval_config_from_dict(eval_data)
    log.info("demo: evaluating the LoRA against the base model into %s", eval_cfg.output_dir)
    evaluated = evaluate(eval_cfg, pipeline_args)
    return {"build": built, "train": trained, "evaluate": evaluated}
