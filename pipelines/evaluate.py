"""``synpref evaluate``: generate with every model on the same prompts and seeds, score with the judges.

    synpref evaluate --config jobs/demo_eval.yaml [--set key.path=value] [beam flags]

The pipeline is the build's own machinery: ``ReadPrompts``, ``GenerateCandidates`` (RunInference,
content-addressed staging: a rerun reuses every image whose key matches), ``ScoreCandidates``
(the judges as one ensemble per group). Seeds are paired: every model draws the same seeds for a
prompt. What comes out (``docs/evaluate.md``): ``images/<model>/<prompt_id>-<i>.png``,
``samples.parquet`` (one row per image, one column per judge), ``dead_letter.jsonl``,
``eval_config.json``, ``run_summary.json``, the report (``summary.json``, ``report.html``) and, last,
``manifest.json`` (every file's sha256). The run's bookkeeping (lock, marker, up-to-date check, stale-file
sweep, summary, exit codes) is ``synpref.runs``, as for build and filter.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
from typing import Any, Optional

import apache_beam as beam
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from ..core.fileio import read_bytes, write_atomic, write_json
from ..reporting import eval_report
from ..runs.health import evaluate_health
from ..runs.manifests import eval_header
from ..runs.pipeline_run import Job, run_job
from ..runs.stale_files import sweep_evaluate
from ..runs.up_to_date import finished_evaluation
from ..schemas.eval_config import EvalConfig
from ..schemas.records import Candidate, Drop
from ..transforms.generation import GenerateCandidates
from ..transforms.prompts import ReadPrompts
from ..transforms.scoring import ScoreCandidates
from .eval_preflight import preflight_evaluate

log = logging.getLogger("synpref.evaluate")

SAMPLES = "samples.parquet"
DEAD_LETTER = "dead_letter.jsonl"
REPORT_FILES = ("summary.json", "report.html")
# files that claim a finished evaluation: removed (with manifest.json) before a run starts
RESULTS = (SAMPLES, *REPORT_FILES, "run_summary.json")
BASE_COLUMNS = (("model", pa.string()), ("prompt_id", pa.string()), ("prompt", pa.string()),
                ("category", pa.string()), ("seed", pa.int64()), ("image", pa.string()))


def samples_schema(judges: list[str]) -> pa.Schema:
    return pa.schema(list(BASE_COLUMNS) + [(j, pa.float64()) for j in judges])


def image_name(model: str, prompt_id: str, index: int) -> str:
    """An image's path relative to the output folder."""
    return f"images/{model}/{prompt_id}-{index}.png"


class _SaveImage(beam.DoFn):
    """A scored image: its staged PNG copied to ``images/<model>/...``; yields ("row", (samples row, PNG
    sha256)), the row's category still empty (``_WriteOutputs`` fills it in)."""

    def __init__(self, output_dir: str, judges: list[str]):
        self.output_dir, self.judges = output_dir.rstrip("/"), judges

    def process(self, element):
        _, c = element
        c: Candidate
        model, index = c.lineage.generator_id, int(c.candidate_id.rsplit("-", 1)[1])
        name = image_name(model, c.prompt_id, index)
        png = read_bytes(c.image_uri)  # PNG bytes, as staged
        write_atomic(f"{self.output_dir}/{name}", png)
        yield "row", ({"model": model, "prompt_id": c.prompt_id, "prompt": c.prompt, "category": "",
                       "seed": int(c.lineage.seed), "image": name, **{j: float(c.scores[j]) for j in self.judges}},
                      hashlib.sha256(png).hexdigest())


def sort_rows(rows: list[dict], models: list[str]) -> list[dict]:
    order = {m: i for i, m in enumerate(models)}
    return sorted(rows, key=lambda r: (order[r["model"]], r["prompt_id"], r["seed"]))


def _write_samples(saved: list[tuple[dict, str]], path: str, models: list[str], judges: list[str]) -> dict:
    """samples.parquet from every saved image's row; returns the rows, the images' and the file's sha256."""
    rows = sort_rows([row for row, _ in saved], models)
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=samples_schema(judges)), buf, compression="zstd")
    write_atomic(path, buf.getvalue())
    return {"rows": rows, "images": {row["image"]: sha for row, sha in sorted(saved, key=lambda s: s[0]["image"])},
            "sha256": hashlib.sha256(buf.getvalue()).hexdigest()}


def _write_drops(drops: list[Drop], path: str) -> dict:
    lines = sorted(d.to_json() for d in drops)
    data = "".join(line + "\n" for line in lines).encode()
    write_atomic(path, data)
    return {"drops": [json.loads(line) for line in lines], "sha256": hashlib.sha256(data).hexdigest()}


class _WriteOutputs(beam.DoFn):
    """The last step, once, on every saved image's row and every drop: ``samples.parquet``,
    ``dead_letter.jsonl``, the report (``summary.json``, ``report.html``), then ``manifest.json``, which
    records every output file's sha256, the counts, the problems and the training rewards. The manifest is
    written last, so a folder holding it holds a finished evaluation (``runs/up_to_date.py``)."""

    def __init__(self, cfg: EvalConfig, header: dict[str, Any]):
        self.cfg, self.header = cfg, header

    def process(self, outcomes: list, categories: dict):
        cfg, out = self.cfg, self.cfg.output_dir.rstrip("/")
        models, judges = [m.name for m in cfg.models], [j.name for j in cfg.judges]
        saved = [value for tag, value in outcomes if tag == "row"]
        for row, _ in saved:
            row["category"] = categories.get(row["prompt_id"], "")
        samples = _write_samples(saved, f"{out}/{SAMPLES}", models, judges)
        drops = _write_drops([value for tag, value in outcomes if tag == "drop"], f"{out}/{DEAD_LETTER}")
        health = evaluate_health(cfg.seeds_per_prompt, models, cfg.max_error_share, samples["rows"], drops["drops"])
        trained, untraced = training_rewards(cfg)
        files = {SAMPLES: samples["sha256"], DEAD_LETTER: drops["sha256"]}
        empty = [m for m, n in health["images_written"].items() if n == 0]
        if not empty:
            write_report(cfg, f"{out}/{SAMPLES}", trained)
            files.update({name: hashlib.sha256(read_bytes(f"{out}/{name}")).hexdigest() for name in REPORT_FILES})
        problems = health.pop("problems")
        write_json(f"{out}/manifest.json", {
            **self.header, "counts": health, "problems": problems, "training_rewards": trained,
            "training_rewards_unknown": untraced, "no_report_for": empty, "files": files,
            "images": samples["images"]})
        yield f"{out}/manifest.json"


class Evaluate(beam.PTransform):
    """The evaluation as one composite; ``expand`` is the diagram:
    ReadPrompts -> GenerateImages (each model, paired seeds) -> ScoreWithJudges -> SaveImages -> WriteOutputs
    (samples.parquet, dead_letter.jsonl, the report, manifest.json)."""

    def __init__(self, cfg: EvalConfig, header: Optional[dict[str, Any]] = None):
        super().__init__()
        self.cfg, self.header = cfg, header if header is not None else eval_header(cfg)

    def expand(self, pbegin):
        cfg = self.cfg
        out = cfg.output_dir.rstrip("/")
        models, judges = [m.name for m in cfg.models], [j.name for j in cfg.judges]
        n = cfg.prompts.num_prompts
        images = None if n is None else n * cfg.seeds_per_prompt * len(models)

        prompts = pbegin | "ReadPrompts" >> ReadPrompts(cfg.prompts, cfg.seed)
        generated = prompts["prompts"] | "GenerateImages" >> GenerateCandidates(
            cfg.generator_configs(), cfg.seeds_per_prompt, cfg.seed, cfg.staging, expected_prompts=n,
            torch_threads=cfg.torch_threads, paired_seeds=True, fingerprints=self.header["model_fingerprints"])
        scored = generated["units"] | "ScoreWithJudges" >> ScoreCandidates(
            cfg.reward_configs(), expected_images=images, torch_threads=cfg.torch_threads, image_facts=False)
        categories = prompts["prompts"] | "Categories" >> beam.Map(lambda r: (r.prompt_id, r.category))
        saved = scored["scored"] | "SaveImages" >> beam.ParDo(_SaveImage(out, judges))
        drops = ([prompts["dropped"], generated["dropped"], scored["dropped"]]
                 | "AllDrops" >> beam.Flatten()
                 | "TagDrops" >> beam.Map(lambda d: ("drop", d)))
        # one gathering step for rows and drops: fewer stages, so less fixed cost per run on any runner
        return ((saved, drops)
                | "RowsAndDrops" >> beam.Flatten()
                | "Gather" >> beam.combiners.ToList()
                | "WriteOutputs" >> beam.ParDo(_WriteOutputs(cfg, self.header), beam.pvalue.AsDict(categories)))


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


def write_report(cfg: EvalConfig, samples_path: str, trained: dict[str, list[str]]) -> dict:
    """summary.json and report.html from samples.parquet (``reporting/eval_report.py``); returns the summary."""
    out = cfg.output_dir.rstrip("/")
    summary = eval_report.evaluation_summary(samples_path, [m.name for m in cfg.models], [j.name for j in cfg.judges],
                                             training_rewards=trained, seed=cfg.seed, n_boot=cfg.bootstrap_samples)
    write_atomic(f"{out}/summary.json", eval_report.summary_json(summary).encode())
    eval_report.write_evaluation_html(summary, out, f"{out}/report.html")
    return summary


def _run_fields(manifest: dict[str, Any]) -> dict[str, Any]:
    """What ``run_summary.json`` says beside the shared run figures: the manifest's counts and traces."""
    return {**manifest["counts"], "training_rewards": manifest["training_rewards"],
            "training_rewards_unknown": manifest["training_rewards_unknown"]}


def evaluate(cfg: EvalConfig, pipeline_args: Optional[list[str]] = None, test_pipeline=None,
             preflight: bool = True, force_unlock: bool = False) -> dict[str, Any]:
    """Run the evaluation under the output folder's lock (``runs.pipeline_run.run_job``, as build and filter);
    returns ``{"samples", "run", "summary", "text"}``: ``run`` is what ``run_summary.json`` holds, ``summary``
    the report (None when a model has no scored image). An identical finished evaluation whose files are
    intact is not run again (``run["up_to_date"]``).

    ``preflight=False`` when the caller has just run ``preflight_evaluate`` (it loads every judge)."""
    out = cfg.output_dir.rstrip("/")
    removed: list[str] = []
    header: dict[str, Any] = {}
    report: dict[str, Any] = {"summary": None}

    def read_report(manifest: Optional[dict]) -> Optional[dict]:  # under the lock: the report this run stands by
        if manifest is not None and not manifest["no_report_for"]:
            with fsspec.open(f"{out}/summary.json", "r") as f:
                report["summary"] = json.load(f)
        return manifest

    def prepare() -> dict[str, Any]:  # raises ValueError / FileNotFoundError: a user mistake, exit 2
        if preflight:
            preflight_evaluate(cfg)
        header.update(eval_header(cfg))  # hashes the models' and judges' files: after preflight found them
        return header

    def sweep(folder: str, manifest: dict) -> list[str]:
        removed.extend(sweep_evaluate(folder, manifest))
        return removed

    def finish(manifest: dict, problems: list[str]) -> dict:
        read_report(manifest)
        return {**_run_fields(manifest), "stale_images_removed": len(removed)}

    result = run_job(Job(
        kind="evaluate", output_dir=out, output_key="output_dir",
        beam_flags=list(cfg.beam_options) + list(pipeline_args or []),
        preflight=prepare, transform=lambda prepared: "Evaluate" >> Evaluate(cfg, prepared),
        problems=lambda manifest: list(manifest["problems"]),
        up_to_date=lambda: read_report(finished_evaluation(out, header["run_fingerprint"])),
        finish=finish, sweep=sweep, config=cfg.resolved(), config_file="eval_config.json", results=RESULTS),
        test_pipeline=test_pipeline, force_unlock=force_unlock)
    manifest, run = result["manifest"], result["summary"]
    if run.get("up_to_date"):
        run = {**_run_fields(manifest), "problems": [], "wall_seconds": 0.0, "counters": {},
               "stage_busy_seconds": {}, "stale_images_removed": 0, "up_to_date": True}
    summary = report["summary"]
    text = (eval_report.format_evaluation(summary) if summary is not None else
            f"(no report: no scored image for {', '.join(manifest['no_report_for'])}; see dead_letter.jsonl)")
    return {"samples": f"{out}/{SAMPLES}", "run": run, "summary": summary, "text": text}


def format_run(result: dict[str, Any]) -> str:
    """What the run did, in a few lines, then the report's text."""
    run = result["run"]
    written = ", ".join(f"{m} {n}" for m, n in run["images_written"].items())
    lines = [f"== synpref evaluate: {run['prompts']} prompts, {run['images_expected_per_model']} images per model ==",
             *(["up to date an identical finished evaluation is in the folder, its files intact: nothing to do"]
               if run.get("up_to_date") else []),
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
