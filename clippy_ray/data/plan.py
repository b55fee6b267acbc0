"""The order a run reads its data in, as plain numbers: a run's *data position* is the count of
rows the stream has handed out since step 0, over every epoch and worker.

Each epoch reads every parquet file once, in an order seeded by (seed, epoch); the files of a run
are fixed by its manifest (listed once, stored with the run: rows added to the prefix later do not
move the position). A stream that starts at position P reads only what comes after P: whole files
before it are never opened and the file P falls into is read from its row offset, so resuming
costs no decoding of rows already trained on. No Ray here: the pipeline turns pieces into reads.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow.parquet as pq

from clippy_ray import storage
from clippy_ray.data.schema import parquet_files


@dataclass(frozen=True)
class DataFile:
    uri: str
    rows: int
    bytes: int


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of one file; `position` is the data position of its first row."""

    uri: str
    start: int
    stop: int
    position: int


def list_files(uri: str) -> list[DataFile]:
    """The .parquet files at `uri` (a file or a folder / prefix), sorted, with their row counts
    from the footers (no row is read)."""
    out = []
    for f in sorted(parquet_files(uri, storage.list_files(uri))):
        fs, path = storage.resolve(f)
        try:
            with fs.open_input_file(path) as handle:
                rows = pq.ParquetFile(handle).metadata.num_rows
                size = handle.size()
        except OSError as err:
            raise storage.describe(f, err) from None
        out.append(DataFile(f, rows, size))
    return out


def dump_manifest(files: list[DataFile]) -> bytes:
    return json.dumps({"files": [asdict(f) for f in files]}, indent=1).encode()


def load_manifest(data: bytes) -> list[DataFile]:
    return [DataFile(**f) for f in json.loads(data)["files"]]


def epoch_order(files: list[DataFile], seed: int, epoch: int, shuffle: bool = True) -> list[DataFile]:
    """The files of one epoch in reading order: a permutation seeded by (seed, epoch)."""
    if not shuffle:
        return list(files)
    rng = np.random.default_rng(zlib.crc32(f"files:{seed}:{epoch}".encode()))
    return [files[i] for i in rng.permutation(len(files))]


def pieces(files: list[DataFile], seed: int, start: int, rows: int, shuffle: bool = True) -> list[Piece]:
    """The file reads that cover `rows` rows from data position `start` on, epoch after epoch:
    one piece per file and epoch, the first one starting at its row offset."""
    per_epoch = sum(f.rows for f in files)
    out: list[Piece] = []
    end = start + rows
    epoch = start // per_epoch if per_epoch else 0
    position = epoch * per_epoch  # the data position of the current file's first row
    while per_epoch and position < end:
        for f in epoch_order(files, seed, epoch, shuffle):
            first, position = position, position + f.rows
            lo = max(start - first, 0)
            if lo < f.rows and first + lo < end:
                out.append(Piece(f.uri, lo, f.rows, first + lo))
            if position >= end:
                break
        epoch += 1
    return out


def epoch_of(position: int, rows_per_epoch: int) -> int:
    return position // rows_per_epoch if rows_per_epoch else 0
