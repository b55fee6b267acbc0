"""The order a run reads its data in, and the record of what it trained on, as plain numbers.

A run's rows are numbered by *data position*: epoch after epoch, each epoch reads every shard
(parquet file, WebDataset tar, files folder: `clippy_ray.data.formats`) once, in an order seeded
by (seed, epoch), so position p is sample p - first(shard) of the shard the epoch's order puts
at p. The shards of a run are fixed by its manifest (listed and counted once, stored with the
run: data added to the prefix later does not move a position).

`TrainedRows` records exactly which positions a run has consumed (trained on, or skipped as bad):
every position below `low`, and a bitmap of those in [low, high). Readers run in parallel and
deliver rows out of order, and rows wait in the workers' shuffle buffers, so the consumed set is
not a prefix; a restarted stream reads exactly its complement (`TrainedRows.untrained`), each file
from the row groups holding those rows, and no row already trained on is decoded again. No Ray here:
the pipeline turns pieces into reads.
"""

from __future__ import annotations

import base64
import json
import zlib
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow.parquet as pq

from clippy_ray import storage
from clippy_ray.data.formats import Layout, detect, shard_sizes


@dataclass(frozen=True)
class DataFile:
    uri: str
    rows: int
    bytes: int


@dataclass(frozen=True)
class Piece:
    """The rows of one file one read task reads: `ranges`, ascending and disjoint [start, stop)
    row ranges; row r of the file is at data position `base + r`; `size`: the file's rows."""

    uri: str
    ranges: tuple[tuple[int, int], ...]
    base: int
    size: int = 0

    @property
    def rows(self) -> int:
        return sum(stop - start for start, stop in self.ranges)


def list_files(uri: str, layout: Layout | None = None, problems: list[str] | None = None) -> list[DataFile]:
    """The shards at `uri` in order, with their sample counts: parquet files (rows from the
    footers, no row read), WebDataset tars or files folders (`formats.shard_sizes`; a shard found
    unreadable while counted goes into `problems`)."""
    layout = layout or detect(uri, "data")
    if layout.format != "parquet":
        sizes, _ = shard_sizes(layout, problems)
        return [DataFile(s, n, 0) for s, n in zip(layout.shards, sizes)]
    out = []
    for f in layout.shards:
        fs, path = storage.resolve(f)
        try:
            with fs.open_input_file(path) as handle:
                rows = pq.ParquetFile(handle).metadata.num_rows
                size = handle.size()
        except OSError as err:
            raise storage.describe(f, err) from None
        out.append(DataFile(f, rows, size))
    return out


def dump_manifest(files: list[DataFile], layout: Layout | None = None) -> bytes:
    columns = {}
    if layout is not None:
        columns = {
            "format": layout.format,
            "image_column": layout.image_column,
            "caption_column": layout.caption_column,
        }
    return json.dumps({**columns, "files": [asdict(f) for f in files]}, indent=1).encode()


def load_manifest(data: bytes) -> tuple[list[DataFile], Layout | None]:
    """(the files, the layout they were listed with; None in a manifest written before formats)."""
    manifest = json.loads(data)
    files = [DataFile(**f) for f in manifest["files"]]
    if "format" not in manifest:
        return files, None
    layout = Layout(
        manifest["format"],
        tuple(f.uri for f in files),
        manifest["image_column"],
        manifest["caption_column"],
        f"{manifest['format']}, {len(files)} shard(s) (the run's manifest)",
    )
    return files, layout


def epoch_order(files: list[DataFile], seed: int, epoch: int, shuffle: bool = True) -> list[DataFile]:
    """The files of one epoch in reading order: a permutation seeded by (seed, epoch)."""
    if not shuffle:
        return list(files)
    rng = np.random.default_rng(zlib.crc32(f"files:{seed}:{epoch}".encode()))
    return [files[i] for i in rng.permutation(len(files))]


def pieces(files: list[DataFile], seed: int, spans: list[tuple[int, int]], shuffle: bool = True) -> list[Piece]:
    """The file reads that cover the data positions in `spans` (ascending, disjoint [lo, hi)),
    epoch after epoch: one piece per file and epoch that holds any of them, in position order."""
    per_epoch = sum(f.rows for f in files)
    spans = [(int(lo), int(hi)) for lo, hi in spans if hi > lo]
    out: list[Piece] = []
    if not per_epoch or not spans:
        return out
    k = 0  # the first span not yet wholly behind the current file
    epoch = spans[0][0] // per_epoch
    while k < len(spans):
        epoch = max(epoch, spans[k][0] // per_epoch)  # skip epochs no span touches
        first = epoch * per_epoch  # the data position of the current file's first row
        for f in epoch_order(files, seed, epoch, shuffle):
            lo, hi = first, first + f.rows
            first = hi
            while k < len(spans) and spans[k][1] <= lo:
                k += 1
            ranges = []
            j = k
            while j < len(spans) and spans[j][0] < hi:
                ranges.append((max(spans[j][0], lo) - lo, min(spans[j][1], hi) - lo))
                j += 1  # (a file of no rows has lo == hi and gets none)
            if ranges:
                out.append(Piece(f.uri, tuple(ranges), lo, f.rows))
            if k == len(spans):
                break
        epoch += 1
    return out


def epoch_of(position: int, rows_per_epoch: int) -> int:
    return position // rows_per_epoch if rows_per_epoch else 0


class RepeatedRows(RuntimeError):
    """Positions handed to training that the record holds already: the stream was not built for
    the state the workers restored."""

    def __init__(self, positions: np.ndarray):
        self.positions = positions
        shown = ", ".join(str(int(p)) for p in positions[:5]) + (" ..." if len(positions) > 5 else "")
        super().__init__(f"{len(positions)} rows trained on before were handed out again (data positions {shown})")


class TrainedRows:
    """The exact set of data positions a run has consumed: all of [0, low), and in [low, high) the
    positions whose bit is set. Positions are added once (`add` refuses one it holds); the bitmap
    spans only the rows read out of order, which the parallel readers and shuffle buffers bound."""

    def __init__(self, low: int = 0, high: int | None = None, bits: np.ndarray | None = None):
        self.low = int(low)
        self.high = self.low if high is None else int(high)
        self.bits = np.zeros(self.high - self.low, bool) if bits is None else np.asarray(bits, bool)
        assert len(self.bits) == self.high - self.low

    @property
    def count(self) -> int:
        """Positions consumed."""
        return self.low + int(self.bits.sum())

    def contains(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, np.int64)
        inside = (positions >= self.low) & (positions < self.high)
        out = positions < self.low
        out[inside] = self.bits[positions[inside] - self.low]
        return out

    def add(self, positions: np.ndarray) -> None:
        """Mark `positions` consumed; RepeatedRows (and no change) if any is consumed already or
        appears twice."""
        positions = np.asarray(positions, np.int64)
        if not len(positions):
            return
        unique, counts = np.unique(positions, return_counts=True)
        if unique[0] < 0:
            raise ValueError(f"negative data positions: {unique[unique < 0][:5].tolist()}")
        repeated = np.union1d(unique[counts > 1], unique[self.contains(unique)])
        if len(repeated):
            raise RepeatedRows(repeated)
        top = int(unique[-1]) + 1
        if top > self.high:
            self.bits = np.concatenate([self.bits, np.zeros(top - self.high, bool)])
            self.high = top
        self.bits[unique - self.low] = True
        self._advance()

    def _advance(self) -> None:
        """Move `low` past the run of consumed positions at the start of the bitmap."""
        holes = np.flatnonzero(~self.bits)
        cut = int(holes[0]) if len(holes) else len(self.bits)
        self.low += cut
        self.bits = self.bits[cut:]

    def untrained(self, rows: int) -> list[tuple[int, int]]:
        """The spans of the first `rows` positions not consumed, ascending: the holes below `high`,
        then from `high` on."""
        spans: list[tuple[int, int]] = []
        padded = np.concatenate([[True], self.bits, [True]])
        edges = np.flatnonzero(np.diff(padded.astype(np.int8)))  # hole starts (-1) and ends (+1)
        left = rows
        for lo, hi in zip(edges[0::2], edges[1::2]):
            take = min(int(hi - lo), left)
            spans.append((self.low + int(lo), self.low + int(lo) + take))
            left -= take
            if not left:
                return spans
        spans.append((self.high, self.high + left))
        return spans

    def to_dict(self) -> dict:
        packed = np.packbits(self.bits).tobytes()
        return {"low": self.low, "high": self.high, "bits": base64.b64encode(zlib.compress(packed)).decode()}

    @classmethod
    def from_dict(cls, data: dict) -> TrainedRows:
        low, high = int(data["low"]), int(data["high"])
        packed = np.frombuffer(zlib.decompress(base64.b64decode(data["bits"])), np.uint8)
        return cls(low, high, np.unpackbits(packed, count=high - low).astype(bool))
