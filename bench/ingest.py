"""Ingest throughput: the full Ray Data pipeline vs a bare single-process loop doing the same
decode + augment + tokenize on the same shard, and that loop x cores (the ideal).

    python bench/ingest.py [--rows 2000] [--source-size 320] [--size 224] [--format jpeg]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import psutil
import pyarrow.parquet as pq

from clippy_ray.config import DataConfig, TextConfig
from clippy_ray.data.benchmark import BenchmarkSpec
from clippy_ray.data.commands import make_benchmark
from clippy_ray.data.pipeline import BatchStream, build_dataset, preprocess_batch
from clippy_ray.ray_init import init_ray


def bare_loop(path: str, data: DataConfig, text: TextConfig, size: int) -> float:
    """rows/s of one process: read the parquet, decode + augment + tokenize batch by batch."""
    kwargs = dict(image_column="image", caption_column="caption", size=size, train=True,
                  min_scale=data.min_crop_scale, text_cfg=tuple(sorted((k, v) for k, v in vars(text).items()
                                                                       if k != "hf_config")), seed=0)
    preprocess_batch({"image": [], "caption": []}, **kwargs)  # warm the tokenizer cache
    start, rows = time.perf_counter(), 0
    for file in sorted(os.listdir(path)):
        table = pq.read_table(os.path.join(path, file), columns=["image", "caption"])
        for batch in table.to_batches(max_chunksize=data.decode_batch_size):
            out = preprocess_batch({"image": batch.column("image").to_numpy(zero_copy_only=False),
                                    "caption": batch.column("caption").to_numpy(zero_copy_only=False)}, **kwargs)
            rows += len(out["valid"])
    return rows / (time.perf_counter() - start)


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


def pipeline(path: str, data: DataConfig, text: TextConfig, size: int, batch_size: int,
             total_rows: int = 0) -> tuple[float, float, float, dict]:
    """-> (seconds to the first batch, steady rows/s, rows/s over the whole epoch, CPU shares in the
    steady window). Steady is the rate between 25% and 90% of the epoch: start-up and the work done
    ahead while the first batch was awaited are both outside that window. With `total_rows`, the
    CPU time of every process is sampled at both ends of the window."""
    ds = build_dataset(path, data, text, size, train=True)
    stream = BatchStream(ds, batch_size, shuffle_buffer=data.shuffle_buffer)
    start = time.perf_counter()
    marks = []  # (time, rows delivered)
    snaps = []  # (time, cpu_seconds()) at 25% and 90% of total_rows
    for _ in stream.epoch(0):
        marks.append((time.perf_counter(), len(marks) * batch_size + batch_size))
        if total_rows and len(snaps) < 2 and marks[-1][1] >= (0.25, 0.90)[len(snaps)] * total_rows:
            snaps.append((time.perf_counter(), cpu_seconds()))
    end = time.perf_counter()
    total = marks[-1][1]
    t0, r0 = next(m for m in marks if m[1] >= 0.25 * total)
    t1, r1 = next(m for m in marks if m[1] >= 0.90 * total)
    shares = (cpu_shares(snaps[0][1], snaps[1][1], snaps[1][0] - snaps[0][0], os.cpu_count() or 1)
              if len(snaps) == 2 else {})
    return marks[0][0] - start, (r1 - r0) / (t1 - t0), stream.rows_seen / (end - start), shares


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=6000)
    parser.add_argument("--source-size", type=int, default=320, help="stored image side")
    parser.add_argument("--size", type=int, default=224, help="training image side")
    parser.add_argument("--format", default="jpeg", choices=("jpeg", "png"))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shuffle-buffer", type=int, default=256)
    parser.add_argument("--decode-cpus", type=float, default=1.0)
    parser.add_argument("--read-cpus", type=float, default=DataConfig.read_cpus)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    init_ray(quiet=True)
    data = DataConfig(decode_batch_size=64, shuffle_buffer=args.shuffle_buffer, decode_cpus=args.decode_cpus,
                      read_cpus=args.read_cpus)
    text = TextConfig(tokenizer="byte", max_length=64)
    with tempfile.TemporaryDirectory() as tmp:
        make_benchmark(tmp, args.rows, 0, BenchmarkSpec(image_size=args.source_size, image_format=args.format),
                       rows_per_shard=250, splits=("train",))
        path = os.path.join(tmp, "train")
        pipeline(path, data, text, args.size, args.batch_size)  # warm-up: worker processes, imports
        bare = bare_loop(path, data, text, args.size)
        first, steady, whole, shares = pipeline(path, data, text, args.size, args.batch_size, total_rows=args.rows)
    print(f"{args.rows} rows, {args.source_size}px {args.format} -> {args.size}px train transform, "
          f"{cores} cores, shuffle buffer {data.shuffle_buffer}, blocks {data.block_mib} MiB, "
          f"read tasks {data.read_cpus} CPU, decode tasks {data.decode_cpus} CPU")
    print(f"bare single-process loop:      {bare:8.1f} rows/s   (x {cores} cores = {bare * cores:.1f})")
    print(f"Ray Data pipeline, steady:     {steady:8.1f} rows/s   (25%-90% of the epoch; first batch at {first:.2f} s)")
    print(f"Ray Data pipeline, whole epoch:{whole:8.1f} rows/s")
    print(f"ratio steady / (bare x cores): {steady / (bare * cores):.2f}   (goal >= 0.90)")
    print(f"ratio steady / bare:           {steady / bare:.2f}")
    print("CPU of the machine in the steady window: " + ", ".join(
        f"{role} {share:.0%}" for role, share in sorted(shares.items(), key=lambda kv: -kv[1])))
    decode = shares.get("decode/read tasks", 0.0)
    if decode:
        per_core = steady / (decode * cores)
        print(f"decode/read tasks: {per_core:.0f} rows/s per busy core = {per_core / bare:.2f}x the bare loop's")
    print("reproduce: python bench/ingest.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()))


if __name__ == "__main__":
    main()
