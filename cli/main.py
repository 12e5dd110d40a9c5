"""The ``synpref`` command: build, train, evaluate, inspect, demo."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from ..core.errors import UserError, error_text, pipeline_failure


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


def load(args, model_cls):
    """The command's config from ``--config`` and ``--set`` (the same grammar for every command)."""
    from ..schemas.loading import load_config

    return load_config(model_cls, args.config, args.set)


def _run_pipeline(command: str, run, args) -> int:
    """A pipeline command: a user mistake found before work starts is one line, exit 2 (``RunRefused``);
    a failure of the run is one line naming the step, exit 1; problems the run recorded are exit 1."""
    from ..runs.errors import RunRefused

    try:
        return run()
    except RunRefused as e:
        raise UserError(f"synpref {command}: {e}") from None
    except Exception as e:  # the job itself failed (a model that does not load, a full disk...)
        if args.verbose:
            raise
        hint = "; finished shards are kept: rerun the same command to resume" if command == "build" else ""
        print(f"synpref {command}: {pipeline_failure(e)}\n(-v shows the traceback{hint})", file=sys.stderr)
        return 1


def _pipeline_command(args, rest, model_cls, job, summary) -> int:
    """build and filter: the config, then the job (its preflight, lock and Beam run inside), then its summary."""
    try:
        cfg = load(args, model_cls)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(f"synpref {args.command}: {' '.join(str(e).split())}") from None

    def run() -> int:
        result = job(cfg, rest, force_unlock=args.force_unlock)
        print(summary(result))
        return 1 if result["summary"]["problems"] else 0
    return _run_pipeline(args.command, run, args)


def cmd_build(args, rest) -> int:
    from ..pipelines.build_preferences import build
    from ..reporting.summaries import build_summary
    from ..schemas.config import BuildConfig

    return _pipeline_command(args, rest, BuildConfig, build, build_summary)


def cmd_evaluate(args, rest) -> int:
    """Compare models (the first is the baseline) on the same prompts and seeds with the judges."""
    from ..pipelines.evaluate import evaluate, format_run
    from ..schemas.eval_config import EvalConfig

    try:
        cfg = load(args, EvalConfig)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(f"synpref evaluate: {' '.join(str(e).split())}") from None

    def run() -> int:  # flags, preflight, lock, marker and the run: runs.pipeline_run.run_job, as build and filter
        result = evaluate(cfg, rest, force_unlock=args.force_unlock)
        print(format_run(result))
        return 1 if result["run"]["problems"] else 0
    return _run_pipeline("evaluate", run, args)


def cmd_check_models(args, rest) -> int:
    """Every model file, folder or hub id the job loads, and whether it is there; exit 2 if any is not."""
    from ..pipelines.preflight import check_plugins, model_files
    from ..schemas.config import BuildConfig
    from ..transforms.model_io import location_status

    try:
        cfg = load(args, BuildConfig)
        check_plugins(cfg)
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
    from ..pipelines.preflight import check_models, check_plugins
    from ..reporting.reward_accuracy import evaluate, format_table, no_usable_pair, write_json
    from ..schemas.config import BuildConfig

    try:
        cfg = load(args, BuildConfig)
        check_plugins(cfg)
        check_models(cfg)
        report = evaluate(cfg, args.pairs)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(f"synpref eval-rewards: {' '.join(str(e).split())}") from None
    empty = no_usable_pair(report)
    if empty:
        print(f"synpref eval-rewards: {empty}", file=sys.stderr)
        return 1
    print(format_table(report))
    if args.json:
        write_json(report, args.json)
    return 0


def cmd_train(args, rest) -> int:
    from ..reporting.summaries import train_summary
    from ..runs.errors import RunRefused
    from ..runs.output_folder import locked_output, require_location
    from ..training.config import TrainConfig
    from ..training.data import TrainInputError
    from ..training.preflight import preflight_train, resolve_data_format
    from ..training.train import train

    if rest:
        raise UserError(f"synpref train: unknown arguments {' '.join(rest)}")
    try:
        config = resolve_data_format(load(args, TrainConfig))
        require_location(config.output_dir, "output_dir")
        preflight_train(config)  # paths, shards, output folder, model files, checkpoint: before the first step
    except (ValueError, FileNotFoundError) as e:
        raise UserError(f"synpref train: {' '.join(str(e).split())}") from None
    try:
        with locked_output(str(config.output_dir), "synpref train", args.force_unlock, what="output_dir"):
            summary = train(config)
    except RunRefused as e:  # another run holds the folder: nothing was done
        raise UserError(f"synpref train: {e}") from None
    except TrainInputError as e:  # a data or resume mistake only the run could see (no usable sample...)
        if args.verbose:
            raise
        raise UserError(f"synpref train: {' '.join(str(e).split())}") from None
    except Exception as e:  # the run failed (a model that does not load, a full disk...): one line, exit 1
        if args.verbose:
            raise
        print(f"synpref train: {getattr(e, 'train_step', 'run')} failed: {error_text(e)} "
              "(-v shows the traceback; with checkpointing_steps, resume_from_checkpoint: latest continues)",
              file=sys.stderr)
        return 1
    print(train_summary(summary))
    return 0


def cmd_inspect(args, rest) -> int:
    import fsspec

    from ..core.fileio import check_file_writable
    from ..reporting.inspect_build import collect_report, format_text

    fs, path = fsspec.core.url_to_fs(args.output_dir.rstrip("/") + "/manifest.json")
    if not fs.exists(path):
        raise UserError(f"synpref inspect: no manifest.json in {args.output_dir}: the build has not finished. "
                        "Shards with a _stats/ file are complete; rerun the same build command to resume.")
    if args.html:  # before the work: a page that cannot be written is a mistake, not a failed run
        try:
            check_file_writable(args.html)
        except ValueError as e:
            raise UserError(f"synpref inspect: --html {e}") from None
    try:
        report = collect_report(args.output_dir, samples=args.samples, verify_shards=not args.no_verify)
    except ValueError as e:  # a manifest this version cannot read
        raise UserError(f"synpref inspect: {' '.join(str(e).split())}") from None
    print(format_text(report))
    if args.html:
        from ..reporting.html import write_html

        print(f"html report: {write_html(report, args.html)}")
    return 1 if report.findings else 0  # a missing, truncated or corrupt shard is a finding: exit 1


def cmd_export(args, rest) -> int:
    from ..formats.export import ExportError, export
    from ..reporting.summaries import export_summary
    from ..runs.errors import RunRefused
    from ..runs.output_folder import locked_output

    try:
        with locked_output(args.out_dir, "synpref export", args.force_unlock, what="out_dir"):
            summary = export(args.format, args.build_dir, args.out_dir, pairs=args.pairs,
                             jpeg_quality=args.jpeg_quality, rows_per_file=args.rows_per_file)
    except (ExportError, RunRefused) as e:
        raise UserError(f"synpref export: {' '.join(str(e).split())}") from None
    print(export_summary(summary))
    expected = summary["manifest_pairs_written"]
    return 0 if expected is None or expected == summary["rows"] else 1


def cmd_filter(args, rest) -> int:
    """Score and filter a web image-text corpus (img2dataset WebDataset shards) with the build's rewards."""
    from ..pipelines.filter_corpus import filter_corpus
    from ..reporting.summaries import filter_summary
    from ..schemas.filter_config import FilterJobConfig

    return _pipeline_command(args, rest, FilterJobConfig, filter_corpus, filter_summary)


def cmd_demo(args, rest) -> int:
    from ..demo.run import run_demo
    from ..pipelines.evaluate import format_run
    from ..reporting.summaries import build_summary, train_summary
    from ..runs.beam_flags import check_beam_flags
    from ..runs.errors import RunRefused

    try:
        check_beam_flags(rest)
    except RunRefused as e:
        raise UserError(f"synpref demo: {e}") from None
    try:
        result = run_demo(args.workdir, num_prompts=args.num_prompts, train_steps=args.train_steps,
                          pipeline_args=rest)
    except RunRefused as e:  # a stage's folder holds something else, or another run holds it
        raise UserError(f"synpref demo: {e} (or give another --workdir)") from None
    print(build_summary(result["build"]))
    if result["train"] is None:
        return 1
    print(train_summary(result["train"]))
    print(format_run(result["evaluate"]))
    return 1 if result["evaluate"]["run"]["problems"] else 0


def cmd_run(args, rest) -> int:
    """build -> train -> evaluate per round; stages whose key matches are skipped (docs/run.md)."""
    from ..pipelines.run_loop import StageFailed, format_run_loop, preflight_run, run_loop
    from ..runs.beam_flags import check_beam_flags
    from ..runs.errors import RunRefused
    from ..runs.output_folder import locked_output
    from ..schemas.run_config import RunConfig

    try:
        cfg = load(args, RunConfig)
        check_beam_flags(rest)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(f"synpref run: {' '.join(str(e).split())}") from None

    def run() -> int:
        try:
            # the lock first: a run refused because another holds the folder creates nothing in it
            with locked_output(cfg.output_dir, "synpref run", args.force_unlock, what="output_dir"):
                try:
                    preflight_run(cfg)
                except (ValueError, FileNotFoundError) as e:
                    raise RunRefused(" ".join(str(e).split())) from None
                result = run_loop(cfg, rest)
        except StageFailed as e:  # one line naming the round and stage; finished stages are kept
            print(f"synpref run: {' '.join(str(e).split())}\n(-v shows the traceback; finished stages are kept: "
                  "rerun the same command to resume)", file=sys.stderr)
            if args.verbose:
                raise
            return 1
        print(format_run_loop(result))
        return 0
    return _run_pipeline("run", run, args)


_UNLOCK = ("remove the output folder's lock (_synpref.lock) even if its owner looks alive; only when you know "
           "no other run writes there (see docs/output_folders.md)")


def main(argv=None) -> int:
    from ..schemas.loading import add_config_args

    parser = argparse.ArgumentParser(prog="synpref", description="Synthetic ranked preference data and RankDPO.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs too")
    sub = parser.add_subparsers(dest="command", required=True)

    def job(name: str, example: str, fn, writes: bool = True, **kw) -> argparse.ArgumentParser:
        """A command that runs a job config: ``--config`` and ``--set`` (and ``--force-unlock`` when it
        writes a folder), declared in one place."""
        p = sub.add_parser(name, **kw)
        add_config_args(p, example)
        if writes:
            p.add_argument("--force-unlock", action="store_true", help=_UNLOCK)
        p.set_defaults(fn=fn)
        return p

    job("build", "jobs/demo_build.yaml", cmd_build,
        help="run the build pipeline (unknown flags go to Beam: --runner, --setup_file...)")
    job("evaluate", "jobs/demo_eval.yaml", cmd_evaluate,
        help="compare models (base, + LoRA, fine-tuned) on the same prompts and seeds with judges: "
             "samples.parquet + report; unknown flags go to Beam")
    job("check-models", "jobs/demo_build.yaml", cmd_check_models, writes=False,
        help="list every model file the job needs (hidden downloads too) and which are missing")
    e = job("eval-rewards", "jobs/demo_build.yaml (its rewards and aggregator are evaluated)", cmd_eval_rewards, writes=False,
            help="pairwise accuracy of each reward and of their aggregate on a human-labelled set "
                 "(Pick-a-Pic v2 parquet schema)")
    e.add_argument("--pairs", required=True, help="parquet with caption, jpg_0, jpg_1, label_0 (local or fsspec URL)")
    e.add_argument("--json", default="", help="also write the figures here")
    job("train", "jobs/demo_train.yaml", cmd_train, help="RankDPO / Diffusion-DPO LoRA training on ranked shards")

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
    x.add_argument("--force-unlock", action="store_true", help=_UNLOCK)
    x.set_defaults(fn=cmd_export)

    job("filter", "jobs/demo_filter.yaml", cmd_filter,
        help="score and filter a web image-text corpus (img2dataset WebDataset shards) with the rewards; "
             "unknown flags go to Beam")

    job("run", "jobs/demo_run.yaml", cmd_run,
        help="build -> train -> evaluate in one resumable job (rounds: on-policy); unknown flags go to Beam")

    d = sub.add_parser("demo", help="tiny offline models -> build -> train -> evaluate, end to end")
    d.add_argument("--workdir", default="out/demo")
    d.add_argument("--num-prompts", type=int, default=64)
    d.add_argument("--train-steps", type=int, default=None, help="default: jobs/demo_train.yaml's max_steps")
    d.set_defaults(fn=cmd_demo)

    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("build", "demo", "train", "filter", "run", "evaluate"):
        parser.error(f"unrecognized arguments: {rest}")
    setup_logging(args.verbose, model_libraries=args.command not in ("inspect", "check-models"))
    try:
        return args.fn(args, rest)
    except UserError as e:
        print(e, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
