"""Ingest throughput: the full Ray Data pipeline vs a bare single-process loop doing the same
decode + augment + tokenize on the same shard, and that loop x cores (the goal's ideal). The
pipeline reads parquet, or (`--data-format webdataset|both`) the same rows as WebDataset .tar
shards, both in the same run. Also
`cores` bare loops running at once as plain processes (no Ray): what this machine gives that many
independent decoders, which a pipeline cannot be expected to beat (beyond noise), so each ratio
can be read against it.

    python bench/ingest.py [--rows 6000] [--copies 4] [--reps 3] [--block-mib 32] [--json PATH] ...   (--help: all)
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import statistics
import tarfile
import tempfile
import time

import psutil
import pyarrow.parquet as pq

from clippy_ray.benchmarks import common
from clippy_ray.config import DataConfig, TextConfig
from clippy_ray.data.benchmark import BenchmarkSpec
from clippy_ray.data.commands import make_benchmark
from clippy_ray.data.pipeline import BatchStream, build_dataset, preprocess_batch, preprocess_kwargs
from clippy_ray.ray_init import init_ray


def bare_loop(path: str, data: DataConfig, text: TextConfig, size: int) -> float:
    """rows/s of one process: read the parquet, decode + augment + tokenize batch by batch."""
    kwargs = preprocess_kwargs(data, text, size, train=True)
    preprocess_batch({"image": [], "caption": []}, **kwargs)  # warm the tokenizer cache
    start, rows = time.perf_counter(), 0
    for file in sorted(os.listdir(path)):
        table = pq.read_table(os.path.join(path, file), columns=["image", "caption"])
        for batch in table.to_batches(max_chunksize=data.decode_batch_size):
            out = preprocess_batch(
                {
                    "image": batch.column("image").to_numpy(zero_copy_only=False),
                    "caption": batch.column("caption").to_numpy(zero_copy_only=False),
                },
                **kwargs,
            )
            rows += len(out["valid"])
    return rows / (time.perf_counter() - start)


def parallel_bare(pool, path: str, data: DataConfig, text: TextConfig, size: int, procs: int) -> float:
    """rows/s of `procs` bare loops at once, each in its own plain process (the pool's, already
    started), summed: the machine's ceiling for `procs` independent decoders."""
    return sum(pool.starmap(bare_loop, [(path, data, text, size)] * procs, chunksize=1))


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """pid -> (process title, user + system CPU seconds) of every process on the machine."""
    out = {}
    for proc in psutil.process_iter(["cmdline", "name"]):
        try:
            times = proc.cpu_times()
            title = " ".join(proc.info["cmdline"] or [proc.info["name"] or "?"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        out[proc.pid] = (title, times.user + times.system)
    return out


def cpu_shares(before: dict, after: dict, seconds: float, cores: int) -> dict[str, float]:
    """Share of the machine's CPU time each role used between two `cpu_seconds` snapshots."""
    roles: dict[str, float] = {}
    for pid, (title, t) in after.items():
        used = t - before.get(pid, (title, 0.0))[1]
        if pid == os.getpid():
            role = "this process (consumer)"
        elif title.startswith("ray::") and not any(a in title for a in ("Actor", "Coordinator")):
            role = "decode/read tasks"  # task workers; their title changes with the task they run (or IDLE)
        elif title.startswith("ray::") or "ray/" in title or "raylet" in title or "gcs_server" in title:
            role = "Ray's own processes"
        else:
            role = "everything else"
        roles[role] = roles.get(role, 0.0) + used / (seconds * cores)
    return roles


def pipeline(path: str, data: DataConfig, text: TextConfig, size: int, batch_size: int, total_rows: int = 0) -> dict:
    """One epoch through the full pipeline -> {first: seconds to the first batch, whole: rows/s
    over the epoch, steady: rows/s between 10% and 90% of `total_rows`, shares: CPU share of each
    role in that window}. Steady is what a long run sees: it leaves out start-up (listing, footer
    reads, task start, the shuffle buffer filling) and the end of the epoch, where the last decode
    task runs alone; `whole` keeps both. Sampling every process's CPU time at both ends of the
    window gives the shares."""
    ds = build_dataset(path, data, text, size, train=True)
    stream = BatchStream(ds, batch_size, shuffle_buffer=data.shuffle_buffer)
    start = time.perf_counter()
    first = None
    marks = []  # (time, rows delivered, cpu_seconds()) at 10% and 90% of total_rows
    rows = 0
    for _ in stream.epoch(0):
        rows += batch_size
        if first is None:
            first = time.perf_counter() - start
        if total_rows and len(marks) < 2 and rows >= (0.1, 0.9)[len(marks)] * total_rows:
            marks.append((time.perf_counter(), rows, cpu_seconds()))
    end = time.perf_counter()
    out = {"first": first, "whole": stream.rows_seen / (end - start), "steady": 0.0, "shares": {}}
    if len(marks) == 2:
        (t0, r0, c0), (t1, r1, c1) = marks
        out.update(steady=(r1 - r0) / (t1 - t0), shares=cpu_shares(c0, c1, t1 - t0, os.cpu_count() or 1))
    return out


def copies_of(path: str, copies: int, out: str, limit: int | None = None) -> str:
    """`out` holding each parquet file of `path` (the first `limit` of them) `copies` times (hard
    links): a long epoch of the same rows the bare loop reads."""
    os.makedirs(out)
    for i in range(copies):
        for file in sorted(os.listdir(path))[:limit]:
            os.link(os.path.join(path, file), os.path.join(out, f"copy{i}-{file}"))
    return out


def as_shards(path: str, out: str) -> str:
    """`out` holding each parquet file of `path` as a WebDataset .tar shard (KEY.jpg/png + KEY.txt
    per row, as img2dataset writes them) and a sizes.json: the same rows in the other layout."""
    os.makedirs(out)
    sizes = {}
    for file in sorted(os.listdir(path)):
        table = pq.read_table(os.path.join(path, file), columns=["image", "caption"])
        name = file.rsplit(".", 1)[0] + ".tar"
        with tarfile.open(os.path.join(out, name), "w") as tar:
            for i, (image, caption) in enumerate(
                zip(table.column("image").to_pylist(), table.column("caption").to_pylist())
            ):
                ext = "png" if image[:4] == b"\x89PNG" else "jpg"
                for member, payload in ((f"{i:09d}.{ext}", image), (f"{i:09d}.txt", caption.encode())):
                    info = tarfile.TarInfo(member)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        sizes[name] = table.num_rows
    with open(os.path.join(out, "sizes.json"), "w") as f:
        json.dump(sizes, f)
    return out


def per_rep(ratios: list[float]) -> str:
    return ", ".join(f"{r:.2f}" for r in ratios)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=6000, help="rows the bare loop reads")
    parser.add_argument("--copies", type=int, default=4, help="the pipeline's epoch is this many copies of them")
    parser.add_argument("--reps", type=int, default=3, help="bare loop + pipeline epoch pairs, interleaved")
    parser.add_argument("--source-size", type=int, default=320, help="stored image side")
    parser.add_argument("--size", type=int, default=224, help="training image side")
    parser.add_argument("--format", default="jpeg", choices=("jpeg", "png"))
    parser.add_argument(
        "--data-format",
        default="parquet",
        choices=("parquet", "webdataset", "both"),
        help="the layout the pipeline reads (both: each rep runs the two, interleaved, on the same rows)",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shuffle-buffer", type=int, default=256)
    parser.add_argument("--decode-batch-size", type=int, default=DataConfig.decode_batch_size)
    parser.add_argument("--block-mib", type=int, default=DataConfig.block_mib)
    parser.add_argument("--decode-cpus", type=float, default=DataConfig.decode_cpus)
    parser.add_argument("--read-cpus", type=float, default=DataConfig.read_cpus)
    common.add_json_argument(parser)
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    init_ray()
    data = DataConfig(
        decode_batch_size=args.decode_batch_size,
        block_mib=args.block_mib,
        shuffle_buffer=args.shuffle_buffer,
        decode_cpus=args.decode_cpus,
        read_cpus=args.read_cpus,
    )
    text = TextConfig(tokenizer="byte", max_length=64)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        make_benchmark(
            tmp,
            args.rows,
            0,
            BenchmarkSpec(image_size=args.source_size, image_format=args.format),
            rows_per_shard=250,
            splits=("train",),
        )
        path = os.path.join(tmp, "train")
        long = copies_of(path, args.copies, os.path.join(tmp, "long"))
        shards = as_shards(long, os.path.join(tmp, "shards")) if args.data_format != "parquet" else None
        main_source = shards if args.data_format == "webdataset" else long
        one_file = copies_of(path, 1, os.path.join(tmp, "warm"), limit=1)
        pipeline(path, data, text, args.size, args.batch_size)  # warm-up: worker processes, imports
        # spawn: plain processes that share nothing with this one's Ray
        with multiprocessing.get_context("spawn").Pool(cores) as pool:
            parallel_bare(pool, one_file, data, text, args.size, cores)  # warm-up: imports
            for rep in range(args.reps):  # interleaved, so all sides see the same machine (its speed drifts)
                bare = bare_loop(path, data, text, args.size)
                parallel = parallel_bare(pool, path, data, text, args.size, cores)
                run = pipeline(main_source, data, text, args.size, args.batch_size, total_rows=args.rows * args.copies)
                runs.append({"bare": bare, "parallel": parallel, **run})
                if args.data_format == "both":
                    wds = pipeline(shards, data, text, args.size, args.batch_size, total_rows=args.rows * args.copies)
                    runs[-1]["webdataset"] = wds
                    print(
                        f"rep {rep}: WebDataset steady {wds['steady']:.0f} rows/s "
                        f"({wds['steady'] / run['steady']:.2f}x "
                        f"of parquet's, {wds['steady'] / (bare * cores):.2f}x of bare x {cores}), whole epoch "
                        f"{wds['whole']:.0f}, first batch {wds['first']:.2f} s",
                        flush=True,
                    )
                print(
                    f"rep {rep}: bare {bare:.0f} rows/s, {cores} at once {parallel:.0f} "
                    f"({parallel / (bare * cores):.2f}x of bare x {cores}), pipeline steady {run['steady']:.0f} "
                    f"({run['steady'] / (bare * cores):.2f}x of bare x {cores}, {run['steady'] / parallel:.2f}x of "
                    f"{cores} at once), whole epoch {run['whole']:.0f}, first batch {run['first']:.2f} s",
                    flush=True,
                )
    med = {k: statistics.median(r[k] for r in runs) for k in ("bare", "parallel", "steady", "whole", "first")}
    goal = [r["steady"] / (r["bare"] * cores) for r in runs]  # the ratio, per rep
    ceiling = [r["parallel"] / (r["bare"] * cores) for r in runs]
    of_ceiling = [r["steady"] / r["parallel"] for r in runs]
    print(
        f"{args.rows} rows x {args.copies} copies, {args.source_size}px {args.format} -> {args.size}px train "
        f"transform, {cores} cores, shuffle buffer {data.shuffle_buffer}, blocks {data.block_mib} MiB, decode "
        f"batches {data.decode_batch_size}, read tasks {data.read_cpus} CPU, decode tasks {data.decode_cpus} CPU; "
        f"medians of {args.reps} interleaved reps:"
    )
    print(f"bare single-process loop:       {med['bare']:8.1f} rows/s   (x {cores} cores = {med['bare'] * cores:.1f})")
    print(
        f"{cores} bare loops at once (no Ray): {med['parallel']:8.1f} rows/s   ({statistics.median(ceiling):.2f}x "
        f"of bare x {cores}: this machine's ceiling; per rep: {per_rep(ceiling)})"
    )
    print(
        f"Ray Data pipeline, steady:      {med['steady']:8.1f} rows/s   (10%-90% of the epoch; "
        f"first batch at {med['first']:.2f} s)"
    )
    print(f"Ray Data pipeline, whole epoch: {med['whole']:8.1f} rows/s")
    print(f"ratio steady / (bare x cores):  {statistics.median(goal):.2f}   (goal >= 0.90; per rep: {per_rep(goal)})")
    print(
        f"ratio steady / ({cores} bare loops at once): {statistics.median(of_ceiling):.2f}   "
        f"(per rep: {per_rep(of_ceiling)})"
    )
    print(
        f"ratio whole epoch / (bare x cores): {statistics.median(r['whole'] / (r['bare'] * cores) for r in runs):.2f}"
    )
    shares = {
        role: statistics.median(r["shares"].get(role, 0.0) for r in runs)
        for role in {role for r in runs for role in r["shares"]}
    }
    print(
        "CPU of the machine in the steady window: "
        + ", ".join(f"{role} {share:.0%}" for role, share in sorted(shares.items(), key=lambda kv: -kv[1]))
        + f", idle {max(0.0, 1 - sum(shares.values())):.0%}"
    )
    decode = shares.get("decode/read tasks", 0.0)
    if decode:
        per_core = med["steady"] / (decode * cores)
        print(f"decode/read tasks: {per_core:.0f} rows/s per busy core = {per_core / med['bare']:.2f}x the bare loop's")
    layouts = {}
    if args.data_format == "both":
        wds_goal = [r["webdataset"]["steady"] / (r["bare"] * cores) for r in runs]
        vs_parquet = [r["webdataset"]["steady"] / r["steady"] for r in runs]
        wds_steady = statistics.median(r["webdataset"]["steady"] for r in runs)
        print(
            f"WebDataset shards, steady:      {wds_steady:8.1f} rows/s   "
            f"({statistics.median(vs_parquet):.2f}x of parquet's, per rep: {per_rep(vs_parquet)}; "
            f"{statistics.median(wds_goal):.2f}x of bare x {cores}, per rep: {per_rep(wds_goal)})"
        )
        layouts = {
            "webdataset_over_parquet": common.spread(vs_parquet),
            "webdataset_over_bare_x_cores": common.spread(wds_goal),
        }
    shown = {k: v for k, v in vars(args).items() if k != "json"}
    print("reproduce: python bench/ingest.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in shown.items()))
    results = {
        "reps": runs,
        "medians_rows_per_s": med,
        "steady_over_bare_x_cores": common.spread(goal),
        "parallel_over_bare_x_cores": common.spread(ceiling),
        "steady_over_parallel": common.spread(of_ceiling),
        "cpu_shares": shares,
        "pipeline_layout": "webdataset" if args.data_format == "webdataset" else "parquet",
        **layouts,
    }
    common.write_json(args.json, "ingest", args, results)
