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
from clippy_ray.data.schema import check_columns, image_bytes
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


def inspect(uri: str, image_column: str = "image", caption_column: str = "caption", sample: int = 256) -> dict:
    """Row count (from parquet metadata), columns, a few captions, and how many of the first
    `sample` images decode."""
    ds = _parquet_dataset(uri)
    check_columns(ds.schema, uri, image_column, caption_column, "--image-column", "--caption-column")
    head = ds.head(sample, columns=[image_column, caption_column])
    decoded = 0
    for value in head.column(image_column).to_pylist():
        data = image_bytes(value)
        try:
            if data is not None:
                open_rgb(data)
                decoded += 1
        except Exception:  # noqa: BLE001 - counting undecodable images is the point
            pass
    return {
        "uri": uri,
        "files": len(ds.files),
        "rows": ds.count_rows(),
        "columns": {f.name: str(f.type) for f in ds.schema},
        "captions": head.column(caption_column).to_pylist()[:5],
        "sampled": head.num_rows,
        "decoded": decoded,
    }


def _read_images(batch: dict[str, np.ndarray], root: str, path_column: str, caption_column: str) -> dict:
    from PIL import Image

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
            Image.open(io.BytesIO(data)).verify()  # header check: corrupt files are left out here
        except Exception:  # noqa: BLE001 - missing or corrupt image: skipped and counted
            continue
        keys.append(str(rel))
        images.append(data)
        captions.append(caption.strip())
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
