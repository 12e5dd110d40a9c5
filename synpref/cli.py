"""The ``synpref`` command: build, train, inspect, demo."""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import warnings


class _DropNoise(logging.Filter):
    """Beam's DirectRunner logs this once per bundle on Linux containers; it says nothing useful here."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return "Resource module is not available" not in msg and "apitools not found" not in msg


def setup_logging(verbose: bool = False, model_libraries: bool = True) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    root = logging.getLogger()
    for h in root.handlers:
        h.addFilter(_DropNoise())
    # Libraries (open_clip logs on the root logger) stay at WARNING; synpref's own progress at INFO.
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("synpref").setLevel(logging.INFO)
    if not verbose:  # a failed job is reported once, in one line, by the command itself
        logging.getLogger("apache_beam").setLevel(logging.CRITICAL)
    if not verbose:
        warnings.filterwarnings("ignore", category=FutureWarning)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if model_libraries and not verbose:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()  # "Loading pipeline components" bars per model load
        transformers_logging.disable_progress_bar()


class UserError(Exception):
    """A bad config or a missing file: reported as one line, without a traceback."""


def pipeline_failure(exc: BaseException) -> str:
    """One line from a failed Beam job: the step that failed and the innermost error.

    Runners wrap a worker's exception (with its whole chain) in their own; the last
    ``Type: message`` line of that text is the error that stopped the job.
    """
    text = str(exc)
    step = re.findall(r"\[while running '([^']+)'\]", text)
    text = re.sub(r"\s*\[while running '[^']+'\]", "", text)
    errors = [ln.strip() for ln in text.splitlines() if re.match(r"^\s*[\w.]+(Error|Exception|Exit)\b.*:", ln)]
    line = errors[-1] if errors else f"{type(exc).__name__}: {(text.strip().splitlines() or [''])[-1]}"
    parts = step[-1].split("/") if step else []
    where = parts[2] if len(parts) > 2 else (parts[-1] if parts else "")  # BuildPreferences/<Stage>/<Step>/...
    line = " ".join(line.split())
    return (f"{where} failed: " if where else "") + (line if len(line) <= 400 else line[:397] + "...")


def cmd_build(args, rest) -> int:
    from synpref.pipelines.build_preferences import build
    from synpref.pipelines.preflight import preflight
    from synpref.report import build_summary
    from synpref.schemas.config import load_build_config

    try:
        cfg = load_build_config(args.config, args.set)
        preflight(cfg)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(f"synpref build: {e}") from None
    try:
        result = build(cfg, rest)
    except Exception as e:  # the job itself failed (a model that does not load, a full disk...)
        if args.verbose:
            raise
        print(f"synpref build: {pipeline_failure(e)}\n(-v shows the traceback; finished shards are kept: "
              "rerun the same command to resume)", file=sys.stderr)
        return 1
    print(build_summary(result))
    return 1 if result["summary"]["problems"] else 0


def cmd_check_models(args, rest) -> int:
    """Every model file, folder or hub id the job loads, and whether it is there; exit 2 if any is not."""
    from synpref.pipelines.preflight import model_files
    from synpref.schemas.config import load_build_config
    from synpref.transforms.model_io import location_status

    try:
        cfg = load_build_config(args.config, args.set)
        files = model_files(cfg)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(f"synpref check-models: {e}") from None
    missing = 0
    for what, location in files:
        ok, status = location_status(location)
        missing += not ok
        print(f"{'ok     ' if ok else 'MISSING'}  {what:<40} {location}  ({status})")
    print(f"{len(files)} model locations, {missing} missing")
    return 2 if missing else 0


def cmd_eval_rewards(args, rest) -> int:
    from synpref.jobs.eval_rewards import evaluate, format_table, write_json
    from synpref.schemas.config import load_build_config
    from synpref.pipelines.preflight import check_models

    try:
        cfg = load_build_config(args.config, args.set)
        check_models(cfg)
        report = evaluate(cfg, args.pairs)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(f"synpref eval-rewards: {' '.join(str(e).split())}") from None
    print(format_table(report))
    if args.json:
        write_json(report, args.json)
    return 0


def cmd_train(args, rest) -> int:
    from synpref.report import train_summary
    from synpref.training.config import TrainConfig
    from synpref.training.preflight import preflight_train, resolve_data_format
    from synpref.training.train import parse_overrides, train

    from synpref.training.data import TrainInputError

    if rest:
        raise UserError(f"synpref train: unknown arguments {rest}")
    try:
        config = resolve_data_format(TrainConfig.from_yaml(args.config, overrides=parse_overrides(args.set)))
        preflight_train(config)  # paths, shards, output folder, model files, checkpoint: before the first step
    except (ValueError, FileNotFoundError) as e:
        raise UserError(f"synpref train: {' '.join(str(e).split())}") from None
    try:
        summary = train(config)
    except TrainInputError as e:  # a data or resume mistake only the run could see (no usable sample...)
        if args.verbose:
            raise
        raise UserError(f"synpref train: {' '.join(str(e).split())}") from None
    except Exception as e:  # the run failed (a model that does not load, a full disk...): one line, exit 1
        if args.verbose:
            raise
        line = " ".join(str(e).split()) or "(no message)"
        line = line if len(line) <= 400 else line[:397] + "..."
        print(f"synpref train: {getattr(e, 'train_step', 'run')} failed: {type(e).__name__}: {line} "
              "(-v shows the traceback; with checkpointing_steps, resume_from_checkpoint: latest continues)",
              file=sys.stderr)
        return 1
    print(train_summary(summary))
    return 0


def cmd_inspect(args, rest) -> int:
    import fsspec

    from synpref.jobs.inspect_output import collect_report, format_text

    fs, path = fsspec.core.url_to_fs(args.output_dir.rstrip("/") + "/manifest.json")
    if not fs.exists(path):
        raise UserError(f"synpref inspect: no manifest.json in {args.output_dir}: the build has not finished. "
                        "Shards with a _stats/ file are complete; rerun the same build command to resume.")
    try:
        report = collect_report(args.output_dir, samples=args.samples, verify_shards=not args.no_verify)
    except ValueError as e:  # a manifest this version cannot read
        raise UserError(f"synpref inspect: {' '.join(str(e).split())}") from None
    print(format_text(report))
    if args.html:
        from synpref.jobs.html_report import write_html

        print(f"html report: {write_html(report, args.html)}")
    return 1 if report.findings else 0  # a missing, truncated or corrupt shard is a finding: exit 1


def cmd_export(args, rest) -> int:
    from synpref.jobs.export import ExportError, export

    try:
        summary = export(args.format, args.build_dir, args.out_dir, pairs=args.pairs,
                         jpeg_quality=args.jpeg_quality, rows_per_file=args.rows_per_file)
    except ExportError as e:
        raise UserError(f"synpref export: {' '.join(str(e).split())}") from None
    expected = summary["manifest_pairs_written"]
    skipped = ", ".join(f"{k}={v}" for k, v in summary["skipped"].items())
    print(f"== synpref export ({summary['format']}, pairs={summary['pairs']}): done ==\n"
          f"rows        {summary['rows']}" + (f" (manifest: {expected} pairs written)" if expected is not None else "")
          + (f"  skipped {skipped}" if skipped else "") + "\n"
          f"label_0=1   {summary['label_0_is_winner']} rows\n"
          f"files       {len(summary['files'])} under {summary['out_dir']}/data/\n"
          f"card        {summary['out_dir']}/README.md")
    return 0 if expected is None or expected == summary["rows"] else 1


def cmd_filter(args, rest) -> int:
    """Score and filter a web image-text corpus (img2dataset WebDataset shards) with the build's rewards."""
    from synpref.pipelines.filter_corpus import filter_corpus, format_summary, preflight_filter
    from synpref.schemas.filter_config import load_filter_config

    try:
        cfg = load_filter_config(args.config, args.set)
        preflight_filter(cfg)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(f"synpref filter: {' '.join(str(e).split())}") from None
    try:
        result = filter_corpus(cfg, rest)
    except Exception as e:  # the job itself failed
        if args.verbose:
            raise
        print(f"synpref filter: {pipeline_failure(e)}\n(-v shows the traceback)", file=sys.stderr)
        return 1
    print(format_summary(result))
    return 1 if result["summary"]["problems"] else 0


def cmd_demo(args, rest) -> int:
    from synpref.jobs.demo import run_demo
    from synpref.report import build_summary, train_summary

    result = run_demo(args.workdir, num_prompts=args.num_prompts, train_steps=args.train_steps, pipeline_args=rest)
    print(build_summary(result["build"]))
    if result["train"] is None:
        return 1
    print(train_summary(result["train"]))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="synpref", description="Synthetic ranked preference data and RankDPO.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs too")
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="run the build pipeline (unknown flags go to Beam: --runner, --setup_file...)")
    b.add_argument("--config", required=True, help="YAML job config, e.g. jobs/demo_build.yaml")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    b.set_defaults(fn=cmd_build)

    c = sub.add_parser("check-models", help="list every model file the job needs (hidden downloads too) and "
                                            "which are missing")
    c.add_argument("--config", required=True, help="YAML job config")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    c.set_defaults(fn=cmd_check_models)

    e = sub.add_parser("eval-rewards", help="pairwise accuracy of each reward and of their aggregate on a "
                                            "human-labelled set (Pick-a-Pic v2 parquet schema)")
    e.add_argument("--config", required=True, help="YAML build config whose rewards and aggregator are evaluated")
    e.add_argument("--pairs", required=True, help="parquet with caption, jpg_0, jpg_1, label_0 (local or fsspec URL)")
    e.add_argument("--json", default="", help="also write the figures here")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    e.set_defaults(fn=cmd_eval_rewards)

    t = sub.add_parser("train", help="RankDPO / Diffusion-DPO LoRA training on ranked shards")
    t.add_argument("--config", required=True, help="YAML train config, e.g. jobs/demo_train.yaml")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    t.set_defaults(fn=cmd_train)

    i = sub.add_parser("inspect", help="summarise and verify a build or filter output directory")
    i.add_argument("output_dir")
    i.add_argument("--samples", type=int, default=None, help="samples to show (a build: ranked prompts, default 2; "
                                                             "a filter: kept samples, default 12)")
    i.add_argument("--no-verify", action="store_true", help="skip re-reading every shard")
    i.add_argument("--html", default="", metavar="PATH", help="also write a self-contained HTML report here "
                                                              "(thumbnails, histograms, reward agreement, drops)")
    i.set_defaults(fn=cmd_inspect)

    x = sub.add_parser("export", help="write a finished build in another format (pickapic: Pick-a-Pic v2 parquet "
                                      "for Diffusion-DPO trainers)")
    x.add_argument("--format", required=True, help="output format: pickapic")
    x.add_argument("build_dir", help="a finished build folder (with manifest.json)")
    x.add_argument("out_dir", help="where to write (empty, new, or an earlier export, which is replaced)")
    x.add_argument("--pairs", choices=("all", "best_worst"), default="all",
                   help="all: every kept pair; best_worst: rank 1 against rank k per prompt")
    x.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality of jpg_0/jpg_1")
    x.add_argument("--rows-per-file", type=int, default=1000, help="rows per parquet file")
    x.set_defaults(fn=cmd_export)

    f = sub.add_parser("filter", help="score and filter a web image-text corpus (img2dataset WebDataset shards) "
                                      "with the rewards; unknown flags go to Beam")
    f.add_argument("--config", required=True, help="YAML filter job, e.g. jobs/demo_filter.yaml")
    f.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    f.set_defaults(fn=cmd_filter)

    d = sub.add_parser("demo", help="tiny offline models -> build -> train, end to end")
    d.add_argument("--workdir", default="out/demo")
    d.add_argument("--num-prompts", type=int, default=64)
    d.add_argument("--train-steps", type=int, default=None, help="default: jobs/demo_train.yaml's max_steps")
    d.set_defaults(fn=cmd_demo)

    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("build", "demo", "train", "filter"):
        parser.error(f"unrecognized arguments: {rest}")
    setup_logging(args.verbose, model_libraries=args.command not in ("inspect", "check-models"))
    try:
        return args.fn(args, rest)
    except UserError as e:
        print(e, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
