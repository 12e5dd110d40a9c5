"""RankDPO / Diffusion-DPO LoRA fine-tuning of a text-to-image denoiser on ranked shards.

Flat, in the diffusers training-script style: ``parse_args`` -> ``main``, which calls
``train(config)``. One loop for every model family; what differs (SD1.x/2.x, SDXL, SD3:
prompt encoding, noising and target, conditioning extras, LoRA saving) is a plug-in in
``training/families/``, chosen from ``model_index.json``. The reference model is the same
denoiser with its LoRA adapter disabled (Wallace et al. 2023, arXiv 2311.12908; docs/math.md s.5), so there is no second copy; with
``finetune: full`` every denoiser weight trains and the reference is a frozen copy made before training.
``eval_every`` generates and scores fixed prompts during training (``evaluation.py``); ``validation_every``
measures the loss and implicit accuracy on held-out pairs (``validation.py``).
The math is in ``losses.py``.

    python -m synpref.training.train --config jobs/demo_train.yaml --set max_steps=20

Several processes: ``accelerate launch --num_processes N -m synpref.training.train --config ...`` on
GPUs; on CPU ``ACCELERATE_USE_CPU=true torchrun --standalone --nproc_per_node N -m synpref.training.train
--config ...`` (gloo; ``accelerate launch --cpu`` starts a single process with accelerate 1.x).
Each process reads and decodes only its share of the data (one step ahead, in a background thread); DDP
all-reduces the LoRA gradients. Logged values reach the host once per optimiser step.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.fileio import dumps_strict, finite_or_none
from ..schemas.loading import add_config_args, dump_config, load_config
from .caching import EncoderCache
from .config import TrainConfig
from .data import RankedBatch, TrainInputError, iter_batches, open_dataset, prefetch
from .families import ModelFamily, family_for
from .losses import implicit_accuracy, preference_pairs, pairwise_dpo_loss, rankdpo_loss_batched
from .preflight import resolve_data_format

logger = logging.getLogger("synpref.training")

LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    """Parse ``--config PATH`` and repeated ``--set KEY=VALUE`` (the grammar of every synpref command)."""
    parser = argparse.ArgumentParser(description="RankDPO / Diffusion-DPO LoRA training on ranked shards.")
    add_config_args(parser, "jobs/demo_train.yaml")
    return parser.parse_args(input_args)


def main(argv: list[str] | None = None) -> dict:
    """CLI entry point: load the config, train, return the summary."""
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    return train(load_config(TrainConfig, args.config, args.set))



METRICS = ("implicit_acc", "model_err", "ref_err")  # logged beside the loss, as diffusers' DPO script
LOG_COLUMNS = ["step", "loss", *METRICS, "lr"]
# Fields that do not change what a step computes: a checkpoint may resume under other values.
RESUME_FREE_FIELDS = {
    "output_dir", "max_steps", "log_every", "torch_threads", "checkpointing_steps", "checkpoints_total_limit",
    "resume_from_checkpoint", "gradient_checkpointing", "cache_latents", "cache_text_embeddings", "report_to",
    "eval_every", "eval_prompts", "eval_rewards", "eval_seed", "eval_steps", "eval_resolution", "eval_guidance_scale",
    "validation_shards", "validation_every",
}
# Fields added later: left out of the config key at their default, so older checkpoints still resume.
NEW_FIELD_DEFAULTS = {"use_8bit_adam": False, "finetune": "lora", "proportion_empty_prompts": 0.0,
                      "validation_fraction": 0.0}
TRACKER_PROJECT = "synpref_train"


def load_models(
    config: TrainConfig, device: torch.device | str = "cpu", weight_dtype: torch.dtype = torch.float32
) -> ModelFamily:
    """Load the frozen parts of ``pretrained_model`` through the family its ``model_index.json`` names."""
    return family_for(config.pretrained_model, config.revision)(config, device, weight_dtype)


def add_lora(
    denoiser: torch.nn.Module, config: TrainConfig, target_modules: list[str] | None = None
) -> list[torch.nn.Parameter]:
    """Attach the trainable LoRA adapter (B = 0, so the model starts equal to the reference); return its parameters."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    denoiser.add_adapter(
        LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            init_lora_weights="gaussian",
            target_modules=target_modules or LORA_TARGET_MODULES,
        )
    )
    cast_training_params(denoiser, dtype=torch.float32)  # LoRA trains in fp32 even over an fp16/bf16 base
    return [p for p in denoiser.parameters() if p.requires_grad]


def make_full_finetune(models: ModelFamily) -> list[torch.nn.Parameter]:
    """Full fine-tuning: a frozen copy of the denoiser becomes ``models.reference``; every denoiser weight trains.

    The reference keeps the frozen weights' dtype (``weight_dtype``); the trained denoiser is fp32
    (accelerate autocasts its forward pass under mixed precision). Returns the trained parameters.
    """
    import copy

    reference = copy.deepcopy(models.denoiser)
    reference.requires_grad_(False)
    reference.eval()
    models.reference = reference
    models.denoiser.to(dtype=torch.float32)
    models.denoiser.requires_grad_(True)
    return list(models.denoiser.parameters())


def reference_predict(models: ModelFamily, noisy: torch.Tensor, timesteps: torch.Tensor,
                      cond: dict[str, torch.Tensor]) -> torch.Tensor:
    """The reference's prediction (no gradient): the frozen copy with ``finetune: full``, else the
    denoiser with its LoRA adapter disabled."""
    with torch.no_grad():
        reference = getattr(models, "reference", None)
        if reference is not None:
            trained = models.denoiser
            models.denoiser = reference  # the family's predict runs whatever its denoiser attribute holds
            try:
                return models.predict(noisy, timesteps, cond)
            finally:
                models.denoiser = trained
        layers = adapter_layers(models)
        for layer in layers:
            layer.enable_adapters(False)
        try:
            return models.predict(noisy, timesteps, cond)
        finally:
            for layer in layers:
                layer.enable_adapters(True)


def adapter_layers(models: ModelFamily) -> list[torch.nn.Module]:
    """The denoiser's LoRA layers (peft ``BaseTunerLayer``), found once: diffusers' ``disable_adapters`` and
    ``enable_adapters`` toggle the same layers but walk every module of the denoiser on each call.

    Raises:
        ValueError: the denoiser has no adapter (as diffusers' ``disable_adapters``).
    """
    layers = getattr(models, "_adapter_layers", None)
    if not layers:
        from peft.tuners.tuners_utils import BaseTunerLayer

        base = getattr(models.denoiser, "module", models.denoiser)  # DDP wraps the denoiser; adapters live inside
        layers = [m for m in base.modules() if isinstance(m, BaseTunerLayer)]
        if not layers:
            raise ValueError("the denoiser has no LoRA adapter (add_lora) and no frozen reference copy")
        models._adapter_layers = layers
    return layers


@dataclass
class StepOutput:
    """A micro-batch's loss and what diffusers' DPO script logs beside it."""

    loss: torch.Tensor
    # [3] float64 on the model's device: METRICS, kept there so a step needs no host sync until it is logged
    stats: torch.Tensor

    @property
    def metrics(self) -> dict[str, float]:
        """``stats`` as floats by name (reads them to the host)."""
        return dict(zip(METRICS, self.stats.tolist()))


def compute_step(
    models: ModelFamily,
    batch: RankedBatch,
    config: TrainConfig,
    generator: torch.Generator,
    cache: EncoderCache | None = None,
) -> StepOutput:
    """One preference loss on a ranked batch: encode, noise, denoise with model and reference, compare.

    ``generator`` (CPU) drives VAE sampling, timesteps and noise, in that order, so a fixed seed
    gives a fixed loss. One timestep (sigma for flow matching) per prompt; noise per prompt
    (``noise: shared``) or per image. ``cache`` (``training/caching.py``) reuses VAE latent
    distributions and prompt embeddings of samples seen before; the loss is the same.
    """
    device = models.device
    group = batch.group.to(device)  # [N]
    n_prompts = len(batch.prompts)

    # ---- conditioning and clean latents (frozen, no gradient)
    cache = cache or EncoderCache(models)  # no caching: calls the family directly
    cond = {k: v[group] for k, v in cache.encode_prompts(batch.prompts).items()}  # [B, ...] -> [N, ...]
    latents = cache.encode_images(batch, generator)  # [N, C, h, w]

    # ---- noising: the family's forward process and regression target
    timesteps = models.sample_timesteps(n_prompts, generator)[group]  # [B] -> [N]
    noise = models.sample_noise(latents, group, n_prompts, config.noise == "shared", generator)  # [N, C, h, w]
    noisy = models.noisy_input(latents, noise, timesteps)
    target = models.target(latents, noise, timesteps)
    weight = models.loss_weight(timesteps)  # [N] or None

    def per_image_mse(pred: torch.Tensor) -> torch.Tensor:
        err = (pred.float() - target.float()) ** 2  # [N, C, h, w]
        if weight is not None:
            err = weight.reshape(-1, *([1] * (err.ndim - 1))) * err
        return err.mean(dim=tuple(range(1, err.ndim)))  # [N]

    # ---- trained model, then the reference: the denoiser with the adapter switched off (LoRA) or its frozen copy
    model_err = per_image_mse(models.predict(noisy, timesteps, cond))
    ref_err = per_image_mse(reference_predict(models, noisy, timesteps, cond))

    # ---- preference loss
    phi, rank = batch.phi.to(device), batch.rank.to(device)
    mask = getattr(batch, "pair_mask", None)  # [N, N] bool with min_pair_agreement, else None
    mask = None if mask is None else mask.to(device)
    if config.loss == "rankdpo":
        loss = rankdpo_loss_batched(model_err, ref_err, phi, rank, group, config.beta, config.discount_rank, mask)
        w, l = preference_pairs(phi, rank, group, "all", mask)
    else:
        loss = pairwise_dpo_loss(model_err, ref_err, phi, rank, group, config.beta, config.dpo_pairs, mask)
        w, l = preference_pairs(phi, rank, group, config.dpo_pairs, mask)
    stats = torch.stack([implicit_accuracy(model_err, ref_err, w, l).to(device), model_err.detach().mean(),
                         ref_err.detach().mean()]).double()
    return StepOutput(loss, stats)


def compute_loss(models: ModelFamily, batch: RankedBatch, config: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """``compute_step``'s loss alone."""
    return compute_step(models, batch, config, generator).loss


# ---- checkpoints (diffusers' names: checkpoint-<step> folders under output_dir)
def config_key(config: TrainConfig) -> str:
    """Hash of every field that changes what a step computes."""
    values = {k: v for k, v in dump_config(config).items()
              if k not in RESUME_FREE_FIELDS and not (k in NEW_FIELD_DEFAULTS and v == NEW_FIELD_DEFAULTS[k])}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (their ``training_state.json`` is written last), oldest first."""
    found = [p.parent for p in Path(output_dir).glob("checkpoint-*/training_state.json")]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]) if p.name.split("-")[1].isdigit() else -1)


def resolve_checkpoint(config: TrainConfig) -> Path | None:
    """The checkpoint ``resume_from_checkpoint`` names, or ``None`` to start fresh."""
    if config.resume_from_checkpoint is None:
        return None
    if config.resume_from_checkpoint == "latest":
        found = list_checkpoints(config.output_dir)
        if not found:
            logger.info("resume_from_checkpoint=latest: no checkpoint in %s, starting fresh", config.output_dir)
        return found[-1] if found else None
    path = Path(config.resume_from_checkpoint)
    if not (path / "training_state.json").is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no training_state.json); "
                                f"give a checkpoint-<step> folder or 'latest'")
    return path


def check_resume(config: TrainConfig) -> tuple[Path | None, dict | None]:
    """The checkpoint to resume from and its ``training_state.json``, or ``(None, None)`` to start fresh.

    Raises:
        FileNotFoundError: ``resume_from_checkpoint`` names a folder that is not a complete checkpoint.
        TrainInputError: its state is unreadable (truncated) or it was trained with a different config.
    """
    checkpoint = resolve_checkpoint(config)
    if checkpoint is None:
        return None, None
    try:
        state = json.loads((checkpoint / "training_state.json").read_text())
        key = state["config_key"]
    except (ValueError, KeyError, TypeError, OSError) as exn:
        raise TrainInputError(f"{checkpoint}/training_state.json is unreadable ({type(exn).__name__}: "
                              f"{' '.join(str(exn).split())}); resume from an earlier checkpoint-<step> folder or "
                              "delete this one") from None
    if key != config_key(config):
        raise TrainInputError(f"{checkpoint} was trained with a different config (key {key} != "
                              f"{config_key(config)}); resume with the same settings or start a new output_dir")
    return checkpoint, state


def log_columns(config: TrainConfig) -> list[str]:
    """``train_log.csv``'s columns: ``LOG_COLUMNS``, and the validation figures when validating."""
    from .validation import VALIDATION_COLUMNS

    return LOG_COLUMNS + (VALIDATION_COLUMNS if config.validation_every else [])


def _rewrite_log(path: Path, up_to_step: int, columns: list[str] = LOG_COLUMNS) -> None:
    """Keep the per-step CSV rows up to a resumed step (an interrupted run may have logged past it)."""
    if not path.is_file():
        return
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) <= up_to_step]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)


def _log_with(config: TrainConfig):
    """Accelerate trackers for ``report_to`` (``None`` for none)."""
    return "tensorboard" if config.report_to == "tensorboard" else None


def _tracker_config(config: TrainConfig) -> dict:
    """The config as tracker hyperparameters (scalars and strings only: TensorBoard's hparams refuse lists/None)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in dump_config(config).items()}


def _make_optimizer(config: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW with ``use_8bit_adam``."""
    optimizer_cls = torch.optim.AdamW
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ValueError("use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None
        optimizer_cls = bnb.optim.AdamW8bit
    return optimizer_cls(
        params,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )


def train(config: TrainConfig) -> dict:
    """Train (``_train``); an exception leaves with ``train_step`` set to the part of the run it came from
    (``load models``, ``step 3``, ``checkpoint-4``, ``save weights``...), for a one-line report."""
    where = {"step": "setup"}
    try:
        return _train(resolve_data_format(config), where)
    except Exception as exn:
        exn.train_step = where["step"]
        raise


def _train(config: TrainConfig, where: dict) -> dict:
    """Train a LoRA adapter with ``config``; save it and ``train_summary.json`` to ``config.output_dir``.

    Returns:
        The summary: steps, first_loss, last_loss, losses, metrics (per step), seconds, skipped
        (bad samples per reason), config, family, finetune, lora_path (the safetensors file; ``None`` with
        ``finetune: full``), denoiser_path (``output_dir/<unet|transformer>`` with ``full``, else ``None``), log_path
        (per-step CSV), resumed_from and output_dir; data_shares (per process, over the whole run, resumed
        or not: samples decoded, prompts trained on, its first 20 distinct prompt ids; and decoded_this_launch,
        the samples this launch decoded: a resume does not decode what came before its checkpoint), lora_checksums (per
        process: sum of the LoRA weights, equal when gradients were synchronised), and cache (the
        encoder caches' memory and encoder call counts of this process); with ``eval_every``, eval (log_path,
        prompts, the evaluated steps, means per reward over those steps, last: the final means); with
        ``validation_every``, validation (source, prompts, pairs, every, steps, loss, implicit_acc, last:
        the held-out figures, ``training/validation.py``).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE
    from diffusers.optimization import get_scheduler

    # ---- setup
    if config.torch_threads > 0:
        torch.set_num_threads(config.torch_threads)
    config.check_environment()  # fp16 without a GPU, missing bitsandbytes / tensorboard: one line each
    mixed_precision = config.mixed_precision
    out = Path(config.output_dir)
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=_log_with(config),
        project_dir=str(out / "logs"),
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes != launched:  # each process would train alone on all the data
        raise ValueError(f"launched as {launched} processes (WORLD_SIZE) but accelerate sees "
                         f"{accelerator.num_processes}; on CPU set ACCELERATE_USE_CPU=true (torchrun + gloo)")
    logger.info("train config: %s", json.dumps(dump_config(config)))
    set_seed(config.seed)
    out.mkdir(parents=True, exist_ok=True)

    # ---- models: frozen base + LoRA adapter on the family's denoiser
    where["step"] = "load models"
    models = load_models(config, accelerator.device, WEIGHT_DTYPES[mixed_precision])
    logger.info("model family: %s (%s)", type(models).__name__, models.pipeline_class)
    full = config.finetune == "full"
    params = make_full_finetune(models) if full else add_lora(models.denoiser, config, models.lora_target_modules)
    if config.init_lora and not full:
        models.load_lora(config.init_lora, models.denoiser)  # start from earlier weights (e.g. the last round's)
    if config.gradient_checkpointing:
        models.denoiser.enable_gradient_checkpointing()  # recompute activations in backward: less memory
    optimizer = _make_optimizer(config, params)
    # accelerate wraps the denoiser (DDP with several processes: gradients are all-reduced in backward)
    # accelerate steps a prepared scheduler once per process, hence the scaling (as diffusers' scripts)
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=config.max_steps * accelerator.num_processes,
    )
    models.denoiser, optimizer, lr_scheduler = accelerator.prepare(models.denoiser, optimizer, lr_scheduler)
    models.denoiser.train()

    # LoRA checkpoints hold the LoRA only (diffusers' format), not the frozen base weights; full fine-tuning
    # checkpoints hold the whole denoiser through accelerate's own model saving (the reference is rebuilt
    # from pretrained_model on resume).
    def save_model_hook(prepared, weights, output_dir):
        for model in prepared:
            if accelerator.is_main_process:
                models.save_lora(output_dir, accelerator.unwrap_model(model))
        weights.clear()

    def load_model_hook(prepared, input_dir):
        while prepared:
            models.load_lora(input_dir, accelerator.unwrap_model(prepared.pop()))

    if not full:
        accelerator.register_save_state_pre_hook(save_model_hook)
        accelerator.register_load_state_pre_hook(load_model_hook)

    # ---- data
    where["step"] = "read data"
    # data_format picks the reader (ranked / pairs / pickapic); each process reads its own share
    dataset = open_dataset(config, rank=accelerator.process_index, world_size=accelerator.num_processes)
    decoded = [0]  # samples this process decoded (its share only), counted at the reader
    reader_decode = dataset.decode

    def counting_decode(sample):
        decoded[0] += 1
        return reader_decode(sample)

    dataset.decode = counting_decode
    prompts_read = [0]  # prompts this process trained on (repeats across epochs counted)
    first_prompt_ids: list[str] = []  # its first 20 distinct prompt ids (bounded: no per-sample memory)

    def note_batch(batch: RankedBatch) -> RankedBatch:
        prompts_read[0] += len(batch.prompt_ids)
        for pid in batch.prompt_ids:
            if len(first_prompt_ids) < 20 and pid not in first_prompt_ids:
                first_prompt_ids.append(pid)
        return batch
    batches = iter_batches(dataset, config.batch_size)
    cache = EncoderCache(models, latents=config.cache_latents, text=config.cache_text_embeddings)
    if config.report_to != "none":
        accelerator.init_trackers(TRACKER_PROJECT, config=_tracker_config(config))
    generator = torch.Generator().manual_seed(config.seed + accelerator.process_index)

    # ---- resume: weights, optimiser, LR scheduler and RNG states from accelerate; ours from JSON
    losses: list[float] = []
    step_metrics: list[dict[str, float]] = []
    micro_batches = 0  # data position: micro-batches consumed
    log_path = out / "train_log.csv"
    eval_path = out / "eval_log.csv"
    evaluator = None
    if config.eval_every:
        from .evaluation import Evaluator

        evaluator = Evaluator(config, models, eval_path)
    validator = None
    if config.validation_every:  # reads the held-out prompts once (counts them) before the first step
        from .validation import Validator

        validator = Validator(config, models)
    columns = log_columns(config)
    where["step"] = "resume"
    checkpoint, state = check_resume(config)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        generator.set_state(torch.load(checkpoint / f"generator_{accelerator.process_index}.pt"))
        losses, step_metrics, micro_batches = state["losses"], state["metrics"], state["micro_batches"]
        if validator is not None:
            validator.history = [h for h in state.get("validation", []) if h["step"] <= len(losses)]
        data_state = checkpoint / f"data_{accelerator.process_index}.json"
        if data_state.is_file():  # jump to this process's data position: skipped samples are not decoded
            share = json.loads(data_state.read_text())
            dataset.load_state_dict(share["reader"])
            decoded[0], prompts_read[0] = share["decoded"], share["prompts"]
            first_prompt_ids[:] = share["first_prompt_ids"]
        else:  # a checkpoint from before data positions were saved: replay the batches (decodes them)
            for _ in range(micro_batches):
                note_batch(next(batches))
        if accelerator.is_main_process:
            _rewrite_log(log_path, len(losses), columns)
            from .evaluation import rewrite_eval_log

            rewrite_eval_log(eval_path, len(losses))
        logger.info("resumed from %s at step %d", checkpoint, len(losses))
    elif accelerator.is_main_process:
        log_path.unlink(missing_ok=True)
        eval_path.unlink(missing_ok=True)

    def evaluate(step: int) -> None:
        """Generate and score the eval prompts on the main process; the others wait."""
        where["step"] = f"evaluation at step {step}"
        if accelerator.is_main_process:
            evaluator.run(step, accelerator.unwrap_model(models.denoiser), accelerator.autocast)
        accelerator.wait_for_everyone()

    def validate(step: int) -> dict:
        """Held-out loss and accuracy of the unwrapped denoiser (DDP must not run a forward on one process)."""
        where["step"] = f"validation at step {step}"
        figures = {}
        if accelerator.is_main_process:
            wrapped = models.denoiser
            models.denoiser = accelerator.unwrap_model(wrapped)
            try:
                figures = validator.run(step, accelerator.autocast)
            finally:
                models.denoiser = wrapped
        accelerator.wait_for_everyone()
        return figures

    def save_checkpoint(step: int) -> None:
        path = out / f"checkpoint-{step}"
        where["step"] = path.name
        accelerator.save_state(str(path))
        torch.save(generator.get_state(), path / f"generator_{accelerator.process_index}.pt")
        share = {**data_position, "prompts": prompts_read[0], "first_prompt_ids": first_prompt_ids}
        (path / f"data_{accelerator.process_index}.json").write_text(dumps_strict(finite_or_none(share)))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state = {"step": step, "micro_batches": micro_batches, "losses": losses, "metrics": step_metrics,
                     "config_key": config_key(config)}
            if validator is not None:
                state["validation"] = validator.history
            marker = path / "training_state.json"  # written last, whole or not at all: marks the checkpoint complete
            marker.with_suffix(".tmp").write_text(dumps_strict(finite_or_none(state)))
            marker.with_suffix(".tmp").replace(marker)
            limit = config.checkpoints_total_limit
            for old in list_checkpoints(out)[:-limit] if limit else []:
                shutil.rmtree(old)
            logger.info("saved checkpoint %s", path)

    # ---- training loop
    decoded_before = decoded[0]  # restored on resume: the run's total so far
    gas = config.gradient_accumulation_steps

    def position() -> dict:
        return {"reader": dataset.state_dict(), "decoded": decoded[0]}

    # the micro-batches still to train on, read and decoded by a background thread one step ahead; each comes
    # with the data position just after it (what a checkpoint saved after that micro-batch resumes from)
    data_position = position()
    fetched = prefetch(batches, (config.max_steps - len(losses)) * gas, position)
    step_sums = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # loss + METRICS, / gas, this step
    start, start_step = time.perf_counter(), len(losses)
    try:
        while len(losses) < config.max_steps:
            where["step"] = f"step {len(losses) + 1}"
            with accelerator.accumulate(models.denoiser):
                batch, data_position = next(fetched)
                out_step = compute_step(models, note_batch(batch), config, generator, cache)
                micro_batches += 1
                accelerator.backward(out_step.loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            step_sums += torch.cat([out_step.loss.detach().double()[None], out_step.stats]) / gas
            if not accelerator.sync_gradients:
                continue
            # one host sync (and one collective) per optimiser step: means over the processes
            step_loss, *step_stats = accelerator.gather(step_sums[None]).mean(dim=0).tolist()
            step_sums.zero_()
            losses.append(step_loss)
            step = len(losses)
            row = {"step": step, "loss": step_loss, **dict(zip(METRICS, step_stats)),
                   "lr": lr_scheduler.get_last_lr()[0]}
            step_metrics.append({k: row[k] for k in LOG_COLUMNS[2:]})
            if validator is not None and validator.due(step):
                figures = validate(step)
                if figures:
                    row.update(val_loss=figures["loss"], val_implicit_acc=figures["implicit_acc"])
            if accelerator.is_main_process:
                new_file = not log_path.is_file()
                with log_path.open("a", newline="") as f:
                    writer = csv.DictWriter(f, columns)
                    if new_file:
                        writer.writeheader()
                    writer.writerow(row)
            if config.report_to != "none":
                accelerator.log({k: row[k] for k in columns[1:] if k in row}, step=step)
            if step % config.log_every == 0 or step == config.max_steps:
                rate = (step - start_step) / (time.perf_counter() - start)
                eta = (config.max_steps - step) / rate
                logger.info("step %d/%d loss %.5f acc %.2f err %.5f ref %.5f %.2f steps/s eta %.0fs", step,
                            config.max_steps, losses[-1], row["implicit_acc"], row["model_err"], row["ref_err"], rate, eta)
            if evaluator is not None and evaluator.due(step):
                evaluate(step)
            if config.checkpointing_steps and step % config.checkpointing_steps == 0:
                save_checkpoint(step)
    finally:
        fetched.close()  # stops the prefetch thread if the loop raised (it has ended otherwise)
    seconds = time.perf_counter() - start

    # ---- save the LoRA (diffusers format, loadable with pipe.load_lora_weights) and a summary
    where["step"] = "save weights"
    accelerator.wait_for_everyone()
    from accelerate.utils import gather_object

    share = {"process": accelerator.process_index, "decoded": decoded[0], "prompts": prompts_read[0],
             "first_prompt_ids": first_prompt_ids, "decoded_this_launch": decoded[0] - decoded_before}
    checksum = float(sum(p.detach().double().sum().item() for p in params))
    logger.info("process %d/%d decoded %d samples (%d prompts trained on); encoder cache %.1f MiB",
                accelerator.process_index, accelerator.num_processes, decoded[0], prompts_read[0],
                cache.nbytes / 2**20)
    summary = {
        "steps": len(losses),
        "first_loss": losses[0] if losses else math.nan,
        "last_loss": losses[-1] if losses else math.nan,
        "losses": losses,
        "metrics": step_metrics,
        "seconds": seconds,
        "skipped": dict(dataset.skipped),
        "config": dump_config(config),
        "family": models.pipeline_class,
        "finetune": config.finetune,
        "lora_path": None if full else str(out / LORA_WEIGHT_NAME_SAFE),
        "denoiser_path": str(out / models.denoiser_name) if full else None,
        "log_path": str(log_path),
        "resumed_from": str(checkpoint) if checkpoint else None,
        "output_dir": str(out),
        "data_shares": gather_object([share]),
        "lora_checksums": gather_object([checksum]),
        "cache": {"bytes": cache.nbytes, "vae_images_encoded": cache.vae_images_encoded,
                  "prompts_encoded": cache.prompts_encoded},
    }
    if validator is not None:
        summary["validation"] = validator.summary()
    if evaluator is not None:
        from .evaluation import read_eval_log

        rows = read_eval_log(eval_path) if accelerator.is_main_process else []
        summary["eval"] = {"log_path": str(eval_path), "prompts": len(evaluator.prompts),
                           "steps": sorted({r["step"] for r in rows}),
                           "means": {r["reward"]: [x["mean"] for x in rows if x["reward"] == r["reward"]]
                                     for r in rows},
                           "last": {r["reward"]: r["mean"] for r in rows if r["step"] == rows[-1]["step"]} if rows else {}}
    if accelerator.is_main_process:
        if full:  # diffusers' format: <Denoiser>.from_pretrained(output_dir / "unet") loads it
            accelerator.unwrap_model(models.denoiser).save_pretrained(out / models.denoiser_name, safe_serialization=True)
        else:
            models.save_lora(out, accelerator.unwrap_model(models.denoiser))
        (out / "train_summary.json").write_text(dumps_strict(finite_or_none(summary), indent=2))
        logger.info("saved %s to %s (%d steps, %.1fs, loss %.5f -> %.5f)", "denoiser" if full else "LoRA",
                    summary["denoiser_path"] or summary["lora_path"], len(losses), seconds, summary["first_loss"], summary["last_loss"])
    accelerator.wait_for_everyone()  # no process tears the process group down while another still uses it
    accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Tear the group down here, not in the interpreter's exit: otherwise gloo's threads are destroyed
        # while joinable and a process can abort ("terminate called without an active exception").
        torch.distributed.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
