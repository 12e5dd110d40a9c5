"""``synpref evaluate``: generate with every model on the same prompts and seeds, score with the judges.

    synpref evaluate --config jobs/demo_eval.yaml [--set key.path=value] [beam flags]

The pipeline is the build's own machinery: ``ReadPrompts``, ``GenerateCandidates`` (RunInference,
content-addressed staging: a rerun reuses every image whose key matches), ``ScoreCandidates``
(the judges as one ensemble per group). Seeds are paired: every model draws the same seeds for a
prompt. What comes out (``docs/evaluate.md``): ``images/<model>/<prompt_id>-<i>.png``,
``samples.parquet`` (one row per image, one column per judge), ``dead_letter.jsonl``,
``eval_config.json``, ``run_summary.json``, and the report: ``summary.json`` and ``report.html``.
"""
from __future__ import annotations

import io
import json
import logging
import time
from typing import Any, Optional

import apache_beam as beam
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.options.pipeline_options import PipelineOptions

from ..core import progress
from ..runs.pipeline_run import synpref_counters
from .eval_preflight import preflight_evaluate
from ..reporting import eval_report
from ..schemas.eval_config import EvalConfig
from ..schemas.records import Candidate, Drop
from ..transforms.accounting import ERROR_REASONS
from ..core.fileio import read_bytes, write_atomic
from ..transforms.generation import GenerateCandidates
from ..transforms.prompts import ReadPrompts
from ..transforms.scoring import ScoreCandidates

log = logging.getLogger("synpref.evaluate")

SAMPLES = "samples.parquet"
BASE_COLUMNS = (("model", pa.string()), ("prompt_id", pa.string()), ("prompt", pa.string()),
                ("category", pa.string()), ("seed", pa.int64()), ("image", pa.string()))


def samples_schema(judges: list[str]) -> pa.Schema:
    return pa.schema(list(BASE_COLUMNS) + [(j, pa.float64()) for j in judges])


def image_name(model: str, prompt_id: str, index: int) -> str:
    """An image's path relative to the output folder."""
    return f"images/{model}/{prompt_id}-{index}.png"


class _SaveImage(beam.DoFn):
    """A scored image: its staged PNG copied to ``images/<model>/...``, and its samples row."""

    def __init__(self, output_dir: str, judges: list[str]):
        self.output_dir, self.judges = output_dir.rstrip("/"), judges

    def process(self, element, categories: dict):
        _, c = element
        c: Candidate
        model, index = c.lineage.generator_id, int(c.candidate_id.rsplit("-", 1)[1])
        name = image_name(model, c.prompt_id, index)
        write_atomic(f"{self.output_dir}/{name}", read_bytes(c.image_uri))  # PNG bytes, as staged
        yield {"model": model, "prompt_id": c.prompt_id, "prompt": c.prompt,
               "category": categories.get(c.prompt_id, ""), "seed": int(c.lineage.seed), "image": name,
               **{j: float(c.scores[j]) for j in self.judges}}


def sort_rows(rows: list[dict], models: list[str]) -> list[dict]:
    order = {m: i for i, m in enumerate(models)}
    return sorted(rows, key=lambda r: (order[r["model"]], r["prompt_id"], r["seed"]))


def _write_samples(rows: list[dict], path: str, models: list[str], judges: list[str]) -> str:
    table = pa.Table.from_pylist(sort_rows(rows, models), schema=samples_schema(judges))
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_atomic(path, buf.getvalue())
    return path


def _write_drops(drops: list[Drop], path: str) -> str:
    lines = sorted(d.to_json() for d in drops)
    write_atomic(path, "".join(line + "\n" for line in lines).encode())
    return path


class Evaluate(beam.PTransform):
    """The evaluation as one composite; ``expand`` is the diagram:
    ReadPrompts -> GenerateImages (each model, paired seeds) -> ScoreWithJudges -> WriteSamples."""

    def __init__(self, cfg: EvalConfig):
        super().__init__()
        self.cfg = cfg

    def expand(self, pbegin):
        cfg = self.cfg
        out = cfg.output_dir.rstrip("/")
        models, judges = [m.name for m in cfg.models], [j.name for j in cfg.judges]
        n = cfg.prompts.num_prompts
        images = None if n is None else n * cfg.seeds_per_prompt * len(models)

        prompts = pbegin | "ReadPrompts" >> ReadPrompts(cfg.prompts, cfg.seed)
        generated = prompts["prompts"] | "GenerateImages" >> GenerateCandidates(
            cfg.generator_configs(), cfg.seeds_per_prompt, cfg.seed, cfg.staging, expected_prompts=n,
            torch_threads=cfg.torch_threads, paired_seeds=True)
        scored = generated["units"] | "ScoreWithJudges" >> ScoreCandidates(
            cfg.reward_configs(), expected_images=images, torch_threads=cfg.torch_threads)
        categories = prompts["prompts"] | "Categories" >> beam.Map(lambda r: (r.prompt_id, r.category))
        samples = (scored["scored"]
                   | "SaveImages" >> beam.ParDo(_SaveImage(out, judges), beam.pvalue.AsDict(categories))
                   | "AllRows" >> beam.combiners.ToList()
                   | "WriteSamples" >> beam.Map(_write_samples, f"{out}/{SAMPLES}", models, judges))
        drops = ([prompts["dropped"], generated["dropped"], scored["dropped"]]
                 | "AllDrops" >> beam.Flatten()
                 | "DropList" >> beam.combiners.ToList()
                 | "DeadLetter" >> beam.Map(_write_drops, f"{out}/dead_letter.jsonl"))
        return {"samples": samples, "dead_letter": drops}


def read_drops(path: str) -> list[dict]:
    fs, p = fsspec.core.url_to_fs(path)
    if not fs.exists(p):
        return []
    return [json.loads(line) for line in fs.cat_file(p).decode().splitlines() if line.strip()]


def run_health(cfg: EvalConfig, table: pa.Table, drops: list[dict]) -> dict[str, Any]:
    """Images written and lost per model, losses per reason and stage, and why the run failed (if it did).

    A model's images are expected for every prompt seen (in the samples or in a candidate drop); a model
    or judge that loses more than ``max_error_share`` of its images is a problem (exit 1).
    """
    models = [m.name for m in cfg.models]
    written = {m: 0 for m in models}
    for m in table.column("model").to_pylist():
        written[m] += 1
    candidate_drops = [d for d in drops if d["level"] == "candidate"]
    prompt_ids = set(table.column("prompt_id").to_pylist())
    for d in candidate_drops:
        prompt_ids.add(d["record_id"].split("-", 1)[0])
    expected = len(prompt_ids) * cfg.seeds_per_prompt
    reasons: dict[str, int] = {}
    by_stage: dict[str, dict[str, Any]] = {}
    for d in drops:
        reasons[f"{d['level']}:{d['reason']}"] = reasons.get(f"{d['level']}:{d['reason']}", 0) + 1
        if d["reason"] in ERROR_REASONS:
            e = by_stage.setdefault(d["stage"], {"count": 0, "first": f"{d['reason']}: {d['detail']}"})
            e["count"] += 1
    problems = []
    if not table.num_rows:
        problems.append("no image was scored: see dead_letter.jsonl")
    for stage, e in sorted(by_stage.items()):
        attempted = expected if stage.startswith("generate:") else max(1, expected * len(models))
        if e["count"] > cfg.max_error_share * attempted:
            problems.append(f"{stage}: {e['count']} of {attempted} images lost (max_error_share "
                            f"{cfg.max_error_share}); first: {e['first']}")
    return {"prompts": len(prompt_ids), "images_expected_per_model": expected, "images_written": written,
            "dropped": dict(sorted(reasons.items())), "errors_by_stage": by_stage, "problems": problems}


def _remove_stale_images(out: str, keep: set[str]) -> int:
    """PNGs under images/ that this run did not write (an earlier run had more prompts or models)."""
    fs, root = fsspec.core.url_to_fs(out)
    removed = 0
    for path in fs.glob(f"{root}/images/*/*.png"):
        if path[len(root):].lstrip("/") not in keep:
            fs.rm(path)
            removed += 1
    return removed


def _manifest_near(location: str) -> Optional[dict]:
    """The build manifest for a training shard location: in it, or one or two folders up (``<build>/ranked``)."""
    base = location.split("*", 1)[0].rstrip("/")
    for _ in range(3):
        fs, p = fsspec.core.url_to_fs(f"{base}/manifest.json")
        if base and fs.exists(p):
            try:
                return json.loads(fs.cat_file(p))
            except ValueError:
                return None
        base = base.rsplit("/", 1)[0] if "/" in base else ""
    return None


def trained_on(weights: str) -> Optional[list[str]]:
    """The rewards whose labels trained ``weights`` (a LoRA or denoiser folder), from its
    ``train_summary.json`` (the shards it read) and those shards' build ``manifest.json`` (the ranking
    rewards); ``[]`` for human labels (``data_format: pickapic``); None when either file is missing."""
    for folder in (weights.rstrip("/"), weights.rstrip("/").rsplit("/", 1)[0]):
        fs, p = fsspec.core.url_to_fs(f"{folder}/train_summary.json")
        if fs.exists(p):
            break
    else:
        return None
    try:
        config = json.loads(fs.cat_file(p)).get("config", {})
    except ValueError:
        return None
    if config.get("data_format") == "pickapic":
        return []
    names: list[str] = []
    for shard in config.get("shards") or []:
        manifest = _manifest_near(str(shard))
        if manifest is None:
            return None
        for r in manifest.get("rewards", []):
            if r.get("rank", True) and r["name"] not in names:
                names.append(r["name"])
    return names


def training_rewards(cfg: EvalConfig) -> tuple[dict[str, list[str]], list[str]]:
    """({model: rewards it was trained on}, models whose training data could not be traced)."""
    known, unknown = {}, []
    for m in cfg.models:
        weights = m.lora or m.denoiser
        if not weights:
            continue
        names = trained_on(weights)
        if names is None:
            unknown.append(m.name)
        else:
            known[m.name] = names
    return known, unknown


def write_report(cfg: EvalConfig, samples_path: str, trained: dict[str, list[str]]) -> tuple[dict, str]:
    """summary.json, report.html and the terminal text, from samples.parquet (``reporting/eval_report.py``)."""
    out = cfg.output_dir.rstrip("/")
    summary = eval_report.evaluation_summary(samples_path, [m.name for m in cfg.models], [j.name for j in cfg.judges],
                                             training_rewards=trained, seed=cfg.seed, n_boot=cfg.bootstrap_samples)
    write_atomic(f"{out}/summary.json", eval_report.summary_json(summary).encode())
    eval_report.write_evaluation_html(summary, out, f"{out}/report.html")
    return summary, eval_report.format_evaluation(summary)


def evaluate(cfg: EvalConfig, pipeline_args: Optional[list[str]] = None, test_pipeline=None,
             preflight: bool = True) -> dict[str, Any]:
    """Run the evaluation and write its outputs; returns ``{"samples", "run", "summary", "text"}``.

    ``preflight=False`` when the caller has just run ``preflight_evaluate`` (it loads every judge)."""
    out = cfg.output_dir.rstrip("/")
    if preflight:
        preflight_evaluate(cfg)
    resolved = cfg.resolved()
    log.info("evaluate config: %s", json.dumps(resolved, sort_keys=True))
    write_atomic(f"{out}/eval_config.json", json.dumps(resolved, indent=2, sort_keys=True, allow_nan=False).encode())
    for stale in (f"{out}/{SAMPLES}", f"{out}/summary.json", f"{out}/report.html", f"{out}/run_summary.json"):
        # while this run works, nothing in the folder claims to be its result
        fs, p = fsspec.core.url_to_fs(stale)
        if fs.exists(p):
            fs.rm(p)
    progress.reset()
    options = PipelineOptions(list(cfg.beam_options) + list(pipeline_args or []), save_main_session=False)
    start = time.monotonic()
    p = test_pipeline or beam.Pipeline(options=options)
    _ = p | "Evaluate" >> Evaluate(cfg)
    result = p.run()
    result.wait_until_finish()
    wall = time.monotonic() - start
    samples_path = f"{out}/{SAMPLES}"
    with fsspec.open(samples_path, "rb") as f:
        table = pq.read_table(f)
    run = run_health(cfg, table, read_drops(f"{out}/dead_letter.jsonl"))
    counters = synpref_counters(result)
    run.update(wall_seconds=round(wall, 2), counters={k: v for k, v in counters.items() if not k.endswith("_ms")},
               stage_busy_seconds={k[:-3]: v / 1000.0 for k, v in counters.items() if k.endswith("_ms")},
               stale_images_removed=_remove_stale_images(out, set(table.column("image").to_pylist())))
    trained, untraced = training_rewards(cfg)
    run.update(training_rewards=trained, training_rewards_unknown=untraced)
    write_atomic(f"{out}/run_summary.json", json.dumps(run, indent=2, sort_keys=True, allow_nan=False).encode())
    empty = [m for m, n in run["images_written"].items() if n == 0]
    summary, text = ((None, f"(no report: no scored image for {', '.join(empty)}; see dead_letter.jsonl)") if empty
                     else write_report(cfg, samples_path, trained))
    return {"samples": samples_path, "run": run, "summary": summary, "text": text}


def format_run(result: dict[str, Any]) -> str:
    """What the run did, in a few lines, then the report's text."""
    run = result["run"]
    written = ", ".join(f"{m} {n}" for m, n in run["images_written"].items())
    lines = [f"== synpref evaluate: {run['prompts']} prompts, {run['images_expected_per_model']} images per model ==",
             f"images     {written} (generated {run['counters'].get('images_generated', 0)}, "
             f"reused {run['counters'].get('images_reused', 0)})",
             f"samples    {result['samples']}"]
    dropped = {k: v for k, v in run["dropped"].items() if k != "prompt:not_sampled"}  # num_prompts did that
    if dropped:
        lines.append("dropped    " + ", ".join(f"{k}={v}" for k, v in dropped.items()) + " (dead_letter.jsonl)")
    if run["training_rewards_unknown"]:
        lines.append("untraced   no train_summary.json/manifest.json for " + ", ".join(run["training_rewards_unknown"])
                     + ": the report cannot say which judges they were trained on")
    lines += [f"PROBLEM    {p}" for p in run["problems"]]
    return "\n".join(lines) + "\n\n" + result["text"]
