"""`clippy-ray data ...`: make the offline benchmark (Ray tasks), inspect a dataset, convert a
folder of images + a CSV/TSV index into sharded parquet (Ray Data)."""

from __future__ import annotations

import dataclasses
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs  # noqa: F401 - pa.fs
import pyarrow.parquet as pq
import ray

from clippy_ray import storage
from clippy_ray.data import benchmark
from clippy_ray.data.schema import image_bytes
from clippy_ray.data.transforms import open_rgb
from clippy_ray.errors import InputError

BENCHMARK_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("image", pa.binary()),
        ("caption", pa.string()),
        ("mask", pa.binary()),
        ("instance_mask", pa.binary()),
        ("labels", pa.list_(pa.int32())),
        ("background", pa.string()),
        ("split", pa.string()),
    ]
)


def write_table(table: pa.Table, uri: str) -> None:
    """One parquet file at `uri`, complete or absent: written to a temporary name, then renamed
    (S3 PUTs are atomic already)."""
    fs, path = storage.resolve(uri)
    if storage.is_s3(uri):
        pq.write_table(table, path, filesystem=fs)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.partial"
    pq.write_table(table, tmp, filesystem=fs)
    os.replace(tmp, path)


@ray.remote(num_cpus=1)
def _benchmark_shard(spec: benchmark.BenchmarkSpec, split: str, start: int, stop: int, uri: str) -> int:
    table = pa.Table.from_pydict(benchmark.make_rows(spec, split, start, stop), schema=BENCHMARK_SCHEMA)
    write_table(table, uri)
    return table.num_rows


def make_benchmark(
    out: str,
    rows: int,
    eval_rows: int | None = None,
    spec: benchmark.BenchmarkSpec | None = None,
    rows_per_shard: int = 500,
    splits: tuple[str, ...] = benchmark.SPLITS,
) -> dict:
    """Write every split as parquet shards under `out/<split>/` plus `out/benchmark.json`.
    `rows` rows for the training splits, `eval_rows` (default max(64, rows // 5)) for the others."""
    spec = spec or benchmark.BenchmarkSpec()
    eval_rows = eval_rows if eval_rows is not None else max(64, rows // 5)
    pending, counts = [], {}
    for split in splits:
        n = rows if split in ("train", "train-spurious") else eval_rows
        counts[split] = n
        for shard, start in enumerate(range(0, n, rows_per_shard)):
            uri = storage.join(out, split, f"part-{shard:05d}.parquet")
            pending.append(_benchmark_shard.remote(spec, split, start, min(n, start + rows_per_shard), uri))
    written = sum(ray.get(pending))
    assert written == sum(counts.values()), (written, counts)
    meta = {
        "spec": dataclasses.asdict(spec),
        "rows": counts,
        "classes": list(benchmark.CLASSES),
        "backgrounds": list(benchmark.BACKGROUNDS),
        "spurious_background": {
            benchmark.CLASSES[c]: benchmark.spurious_background(c) for c in range(1, len(benchmark.CLASSES))
        },
    }
    fs, path = storage.resolve(storage.join(out, "benchmark.json"))
    if not storage.is_s3(out):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(meta, indent=2).encode())
    return meta


def _parquet_dataset(uri: str) -> pads.Dataset:
    fs, path = storage.resolve(uri)
    try:
        return pads.dataset(path, filesystem=fs, format="parquet")
    except pa.ArrowInvalid as err:  # the last clause of Arrow's chain says why
        reason = str(err).strip().splitlines()[0].rsplit(": ", 1)[-1]
        raise InputError(f"{uri}: not parquet ({reason}); give a parquet file or a folder of them") from None
    except (OSError, FileNotFoundError) as err:
        raise storage.describe(uri, err) from None


def parquet_size(uri: str) -> tuple[int, int]:
    """(rows, files) of a parquet file or folder, from the footers alone."""
    ds = _parquet_dataset(uri)
    return ds.count_rows(), len(ds.files)


def inspect(
    uri: str, image_column: str = "image", caption_column: str = "caption", sample: int = 256, fmt: str = "auto"
) -> dict:
    """What is at `uri` in any format the pipeline reads: the layout detected (one line), shards,
    samples (parquet: from the footers; tars: sizes.json / img2dataset's stats, else by reading
    them), a few captions, the first image's size, and of the first `sample` samples how many
    decode and why the others cannot be used."""
    from clippy_ray.data.formats import check, detect, shard_sizes
    from clippy_ray.data.pipeline import SKIP_REASONS, _read_pieces
    from clippy_ray.data.plan import DataFile, list_files, pieces

    layout = detect(uri, None, fmt, image_column, caption_column)
    check(layout, None, uri)
    if layout.format == "parquet":
        ds = _parquet_dataset(uri)
        columns = {f.name: str(f.type) for f in ds.schema}
        files, counted = list_files(uri, layout), "parquet footers"
    else:
        sizes, counted = shard_sizes(layout)
        files, columns = [DataFile(s, n, 0) for s, n in zip(layout.shards, sizes)], {}
    total = sum(f.rows for f in files)
    plan = pieces(files, 0, [(0, min(sample, total))], shuffle=False)
    reasons = dict.fromkeys(SKIP_REASONS[1:], 0)
    captions, size, decoded, sampled = [], None, 0, 0
    for piece in plan:
        batch = {"uri": [piece.uri], "ranges": [json.dumps(piece.ranges)], "base": [piece.base], "size": [piece.size]}
        columns_read = [layout.image_column, layout.caption_column]
        for table in _read_pieces(batch, columns_read, 2**26, layout.format, layout.caption_column):
            rows = table.to_pylist()
            for row in rows:
                sampled += 1
                caption = row["caption"].strip() if isinstance(row["caption"], str) else ""
                if caption and len(captions) < 5:
                    captions.append(caption)
                data = image_bytes(row["image"])
                if row.get("skip"):
                    reasons[SKIP_REASONS[-1]] += 1
                    continue
                if data is None or not caption:
                    reasons["no image" if data is None else "no caption"] += 1
                    continue
                try:
                    image = open_rgb(data)
                except Exception:  # noqa: BLE001 - counting undecodable images is the point
                    reasons["undecodable image"] += 1
                    continue
                decoded += 1
                size = size or image.size
    return {
        "uri": uri,
        "format": layout.format,
        "detected": layout.note,
        "files": len(files),
        "rows": total,
        "counted": counted,
        "columns": columns,
        "captions": captions,
        "image_size": list(size) if size else None,
        "sampled": sampled,
        "decoded": decoded,
        "bad": {k: v for k, v in reasons.items() if v},
    }


def _read_images(batch: dict[str, np.ndarray], root: str, path_column: str, caption_column: str) -> dict:
    """Rows whose image reads and whose caption is non-empty; the others are left out (and
    counted by `convert` as input rows minus written rows)."""
    fs, base = storage.resolve(root)
    keys, images, captions = [], [], []
    for rel, caption in zip(batch[path_column], batch[caption_column]):
        if not isinstance(caption, str) or not caption.strip():
            continue
        try:
            with fs.open_input_file(f"{base}/{str(rel).lstrip('/')}") as f:
                data = f.read()
        except OSError:  # missing: skipped and counted
            continue
        if _opens(data):
            keys.append(str(rel))
            images.append(data)
            captions.append(caption.strip())
    return _parquet_rows(keys, images, captions)


def _opens(data: bytes) -> bool:
    """The image's header reads (a corrupt file is left out of a conversion, and counted)."""
    from PIL import Image

    try:
        Image.open(io.BytesIO(data)).verify()
    except Exception:  # noqa: BLE001 - any undecodable image
        return False
    return True


def _parquet_rows(keys: list, images: list, captions: list) -> dict[str, np.ndarray]:
    return {
        "key": np.asarray(keys, dtype=object),
        "image": np.asarray(images, dtype=object),
        "caption": np.asarray(captions, dtype=object),
    }


def convert(
    index: str,
    out: str,
    image_root: str | None = None,
    rows_per_shard: int = 10_000,
    path_column: str = "path",
    caption_column: str = "caption",
) -> dict:
    """A CSV (or .tsv) index with `path` and `caption` columns, paths relative to `image_root`
    (default: the index's folder) -> parquet shards of about `rows_per_shard` rows under `out`.
    Rows whose image is missing or undecodable, or whose caption is empty, are skipped and counted."""
    from pyarrow import csv

    fs, index_path = storage.resolve(index)
    root = image_root or os.path.dirname(index if storage.is_s3(index) else os.path.abspath(index))
    delimiter = "\t" if index.endswith((".tsv", ".tsv.gz")) else ","
    ds = ray.data.read_csv(index_path, filesystem=fs, parse_options=csv.ParseOptions(delimiter=delimiter))
    columns = ds.schema().names
    for col in (path_column, caption_column):
        if col not in columns:
            raise InputError(
                f"{index}: no column {col!r} in the index; columns found: {', '.join(columns)} "
                "(the first line must be a header naming the image path and caption columns)"
            )
    out_fs, out_path = storage.resolve(out)
    if storage.exists(out) and out_fs.get_file_info(pa.fs.FileSelector(out_path, recursive=True)):
        raise InputError(f"{out}: not empty; convert writes into an empty location")
    total = ds.count()
    good = ds.map_batches(
        _read_images,
        fn_kwargs=dict(root=root, path_column=path_column, caption_column=caption_column),
        batch_format="numpy",
        batch_size=256,
    )
    good.write_parquet(out_path, filesystem=out_fs, min_rows_per_file=rows_per_shard, max_rows_per_file=rows_per_shard)
    written = _parquet_dataset(out).count_rows()
    return {"index": index, "out": out, "rows": total, "written": written, "skipped": total - written}


def _usable(batch: dict[str, np.ndarray]) -> dict:
    """The samples whose image opens and whose caption is non-empty, as parquet rows (key = data
    position); the others are left out and counted by `convert_dataset`."""
    keys, images, captions = [], [], []
    skips = batch.get("skip")
    for i, (position, data, caption) in enumerate(zip(batch["position"], batch["image"], batch["caption"])):
        data = image_bytes(data)
        if (skips is not None and skips[i]) or data is None or not isinstance(caption, str) or not caption.strip():
            continue
        if _opens(data):
            keys.append(str(position))
            images.append(data)
            captions.append(caption.strip())
    return _parquet_rows(keys, images, captions)


def convert_dataset(
    data: str,
    out: str,
    rows_per_shard: int = 10_000,
    fmt: str = "auto",
    image_column: str = "image",
    caption_column: str = "caption",
    read_tasks: int = 0,
) -> dict:
    """Any layout the pipeline reads (WebDataset shards, img2dataset parquet or files, parquet) ->
    parquet shards of about `rows_per_shard` rows (`key`, `image`, `caption`) under `out`, through
    the training pipeline's own readers. Samples without an image or caption, with an undecodable
    image, or lost in an unreadable shard are skipped and counted."""
    from clippy_ray.config import DataConfig
    from clippy_ray.data.formats import check, detect
    from clippy_ray.data.pipeline import read_plan
    from clippy_ray.data.plan import list_files, pieces

    layout = detect(data, "--data", fmt, image_column, caption_column)
    check(layout, "--data", data)
    out_fs, out_path = storage.resolve(out)
    if storage.exists(out) and out_fs.get_file_info(pa.fs.FileSelector(out_path, recursive=True)):
        raise InputError(f"{out}: not empty; convert writes into an empty location")
    files = list_files(data, layout)
    total = sum(f.rows for f in files)
    ds = read_plan(pieces(files, 0, [(0, total)], shuffle=False), layout, DataConfig(read_tasks=read_tasks))
    good = ds.map_batches(_usable, batch_format="numpy", batch_size=256)
    good.write_parquet(out_path, filesystem=out_fs, min_rows_per_file=rows_per_shard, max_rows_per_file=rows_per_shard)
    written = _parquet_dataset(out).count_rows() if storage.exists(out) else 0
    return {
        "index": data,
        "format": layout.format,
        "out": out,
        "rows": total,
        "written": written,
        "skipped": total - written,
    }
