"""Ray Data pipeline: parquet, WebDataset shards or img2dataset files (local or s3://) -> decode +
augment + tokenize in map_batches -> fixed-size batches of valid rows on each training worker.

Rows come in the order of a plan (`clippy_ray.data.plan`): each carries its data position, and a
stream can start at any position without reading what came before it.

Bad rows (undecodable image, empty caption, missing value) are flagged `valid = 0` by the decode
step and dropped, and counted, where batches are assembled (`BatchStream`), so no row is lost
silently and every batch still has exactly `batch_size` rows (the gathered loss needs that).
"""

from __future__ import annotations

import functools
import itertools
import json
import zlib
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from clippy_ray import storage
from clippy_ray.config import DataConfig, TextConfig
from clippy_ray.data.formats import UNREADABLE, Layout, detect, read_samples
from clippy_ray.data.plan import DataFile, Piece, list_files, pieces
from clippy_ray.data.schema import image_bytes
from clippy_ray.data.transforms import load_image
from clippy_ray.errors import InputError


def _row_group_runs(meta, ranges: list[tuple[int, int]]) -> list[tuple[list[int], int]]:
    """The row groups holding any row of `ranges`, as runs of consecutive groups: [(groups, the
    first row of the run)]."""
    runs: list[tuple[list[int], int]] = []
    row, k = 0, 0
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        while k < len(ranges) and ranges[k][1] <= row:
            k += 1
        if k < len(ranges) and ranges[k][0] < row + n:
            if runs and runs[-1][0][-1] == g - 1:
                runs[-1][0].append(g)
            else:
                runs.append(([g], row))
        row += n
    return runs


def _read_pieces(
    batch: dict, columns: list[str], block_bytes: int, layout_format: str = "parquet", caption_column: str = "caption"
) -> Iterator[pa.Table]:
    """One map_batches call per piece (sample ranges of one shard): those samples in blocks of
    about `block_bytes` encoded, as `image`, `caption`, `position` (each row's data position) and,
    from WebDataset / files shards, `skip` (why the reader could not give the sample, else "")."""
    for uri, ranges, base, size in zip(batch["uri"], batch["ranges"], batch["base"], batch["size"]):
        ranges, base = [tuple(r) for r in json.loads(ranges)], int(base)
        if layout_format == "parquet":
            for table in _read_parquet(uri, ranges, base, columns, block_bytes):
                yield table.rename_columns(["image", "caption", "position"])
        else:
            yield from _read_shard(layout_format, uri, ranges, base, int(size), caption_column, block_bytes)


def _read_shard(
    layout_format: str, uri: str, ranges: list, base: int, size: int, caption_column: str, block_bytes: int
) -> Iterator[pa.Table]:
    """A WebDataset tar's or files folder's samples in `ranges`, in blocks of about `block_bytes`."""
    rows: dict[str, list] = {"image": [], "caption": [], "position": [], "skip": []}
    held = 0
    for sample in read_samples(layout_format, uri, ranges, size, caption_column):
        rows["image"].append(sample.image)
        rows["caption"].append(sample.caption)
        rows["position"].append(base + sample.index)
        rows["skip"].append(sample.skip)
        held += len(sample.image or b"")
        if held >= block_bytes:
            yield _samples_table(rows)
            rows, held = {k: [] for k in rows}, 0
    if rows["position"]:
        yield _samples_table(rows)


def _samples_table(rows: dict[str, list]) -> pa.Table:
    return pa.table(
        {
            "image": pa.array(rows["image"], pa.binary()),
            "caption": pa.array(rows["caption"], pa.string()),
            "position": pa.array(rows["position"], pa.int64()),
            "skip": pa.array(rows["skip"], pa.string()),
        }
    )


def _read_parquet(uri: str, ranges: list, base: int, columns: list[str], block_bytes: int) -> Iterator[pa.Table]:
    """The rows of `ranges` of one parquet file; row groups that hold none of them are not read."""
    bounds = np.array(ranges, np.int64).reshape(-1, 2)
    fs, path = storage.resolve(uri)
    try:
        with fs.open_input_file(path) as handle:
            parquet = pq.ParquetFile(handle)
            meta = parquet.metadata
            missing = [c for c in columns if c not in parquet.schema_arrow.names]
            if missing:
                raise InputError(f"{uri}: no column {missing[0]!r}; every file of the dataset needs {columns}")
            block_rows = max(1, int(block_bytes * meta.num_rows / max(handle.size(), 1)))
            for groups, row in _row_group_runs(meta, ranges):
                for record_batch in parquet.iter_batches(batch_size=block_rows, row_groups=groups, columns=columns):
                    rows = np.arange(row, row + record_batch.num_rows)
                    row += record_batch.num_rows
                    # the rows of this batch inside a range: ranges are sorted and disjoint
                    at = np.searchsorted(bounds[:, 0], rows, side="right") - 1
                    keep = np.flatnonzero((at >= 0) & (rows < bounds[np.maximum(at, 0), 1]))
                    if not len(keep):
                        continue
                    table = pa.Table.from_batches([record_batch]).select(columns)
                    if len(keep) < len(rows):
                        table = table.take(pa.array(keep))
                    yield table.append_column("position", pa.array(base + rows[keep]))
                    if rows[-1] + 1 >= bounds[-1, 1]:
                        break
    except OSError as err:
        raise storage.describe(uri, err) from None


def read_plan(plan: list[Piece], layout: Layout, cfg: DataConfig) -> ray.data.Dataset:
    """The samples of `plan` (pieces of shards), in plan order up to Ray's task concurrency, each
    with its `position`, as `image` and `caption` columns whatever the layout names them."""
    items = [{"uri": p.uri, "ranges": json.dumps(p.ranges), "base": p.base, "size": p.size} for p in plan]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 10_000)))
    # Capped: at 0.1 CPU a read task would otherwise run 10 to a core, each a process of its own.
    tasks = cfg.read_tasks or max(2, int(ray.cluster_resources().get("CPU", 0)) // 16)
    return ds.map_batches(
        _read_pieces,
        fn_kwargs={
            "columns": [layout.image_column, layout.caption_column],
            "block_bytes": cfg.block_mib * 2**20,
            "layout_format": layout.format,
            "caption_column": layout.caption_column,
        },
        batch_size=1,
        batch_format="numpy",
        num_cpus=cfg.read_cpus,
        compute=ray.data.TaskPoolStrategy(size=tasks),
    )


SKIP_REASONS = ("", "no image", "no caption", "undecodable image", UNREADABLE)  # by code; 0: not skipped
SKIP_CODES = {reason: code for code, reason in enumerate(SKIP_REASONS)}


@functools.lru_cache(maxsize=4)
def _tokenizer(text_cfg: tuple):
    from clippy_ray.tokenizer import build_tokenizer

    return build_tokenizer(TextConfig(**dict(text_cfg)))


def preprocess_batch(
    batch: dict[str, np.ndarray],
    *,
    image_column: str,
    caption_column: str,
    size: int,
    train: bool,
    min_scale: float,
    text_cfg: tuple,
    seed: int,
) -> dict[str, np.ndarray]:
    """One map_batches call: {image, caption[, skip]} -> {image uint8 [N,3,S,S], input_ids,
    attention_mask, valid uint8 [N], skip uint8 [N] (why a row is not valid: SKIP_REASONS),
    problem [N] (an unreadable shard's message, else "")}. Augmentation randomness is fresh per
    call in training, fixed in eval."""
    n = len(batch[caption_column])
    rng = np.random.default_rng(None if train else seed)
    images = np.zeros((n, 3, size, size), np.uint8)
    valid = np.zeros(n, np.uint8)
    skip = np.zeros(n, np.uint8)
    problem = np.array(batch["skip"], dtype=object) if "skip" in batch else np.full(n, "", dtype=object)
    captions = []
    for i in range(n):
        caption = batch[caption_column][i]
        caption = caption.strip() if isinstance(caption, str) else ""
        captions.append(caption)
        data = image_bytes(batch[image_column][i])
        if problem[i]:
            skip[i] = SKIP_CODES[UNREADABLE]
            continue
        if data is None or not caption:
            skip[i] = SKIP_CODES["no image" if data is None else "no caption"]
            continue
        try:
            images[i] = load_image(data, size, train, rng, min_scale)
        except Exception:  # noqa: BLE001 - any undecodable image is a bad row, skipped and counted
            skip[i] = SKIP_CODES["undecodable image"]
            continue
        valid[i] = 1
    tokens = _tokenizer(text_cfg)(captions)
    out = {"image": images, "valid": valid, "skip": skip, "problem": problem, "input_ids": tokens["input_ids"]}
    out["attention_mask"] = tokens["attention_mask"]
    if "position" in batch:
        out["position"] = np.asarray(batch["position"], np.int64)
    return out


def preprocess_kwargs(data_cfg: DataConfig, text_cfg: TextConfig, image_size: int, train: bool) -> dict:
    """`preprocess_batch`'s settings for rows read by `read_plan` (`image` and `caption` columns)."""
    return dict(
        image_column="image",
        caption_column="caption",
        size=image_size,
        train=train,
        min_scale=data_cfg.min_crop_scale,
        text_cfg=tuple(sorted((k, v) for k, v in vars(text_cfg).items() if k != "hf_config")),
        seed=data_cfg.seed,
    )


def build_dataset(
    uri: str,
    data_cfg: DataConfig,
    text_cfg: TextConfig,
    image_size: int,
    train: bool,
    rows: int | None = None,
    files: list[DataFile] | None = None,
    spans: list[tuple[int, int]] | None = None,
    layout: Layout | None = None,
) -> ray.data.Dataset:
    """The stream the training loop consumes: the data positions in `spans` (default: the first
    `rows` rows, default one epoch), one output row per input row (bad ones flagged), each with its
    `position`. In training each epoch reads the files in a new seeded order; otherwise in sorted
    order, so `rows` always selects the same rows. `layout` (default: detected at `uri` with
    data.format) says how `files` are read."""
    if layout is None:
        layout = detect(uri, "data", data_cfg.format, data_cfg.image_column, data_cfg.caption_column)
    files = files if files is not None else list_files(uri, layout)
    if spans is None:
        spans = [(0, sum(f.rows for f in files) if rows is None else rows)]
    plan = pieces(files, data_cfg.seed, spans, shuffle=train)
    ds = read_plan(plan, layout, data_cfg)
    # Set on this dataset's own context (the datasets derived from it, including what Ray Train
    # streams, inherit it; the process-wide DataContext is left alone).
    # One read block of encoded images is one decode task. Ray's default of 128 MiB makes a whole
    # small dataset one task (one busy core); small blocks make many short tasks and a core idles
    # at every hand-over. 32 MiB blocks with 256-row decode batches (one decoded block per call,
    # which BatchStream reads without combining chunks), vs 16 MiB / 64 rows on 2 cores: first
    # batch after 8-10 s instead of 15 s, the consumer at 5-6% of the machine instead of 8%
    # (bench/ingest.py).
    ds.context.target_max_block_size = data_cfg.block_mib * 2**20
    # Ray Data reserves a share of the CPUs for each operator; on a small machine that keeps the
    # decode operator to one task while parquet reads run (seen on 2 cores: one decoder busy for the
    # whole read phase). This pipeline is three task operators in a line, which the reservation is
    # not needed for.
    ds.context.op_resource_reservation_enabled = False
    return ds.map_batches(
        preprocess_batch,
        fn_kwargs=preprocess_kwargs(data_cfg, text_cfg, image_size, train),
        batch_size=data_cfg.decode_batch_size,
        batch_format="numpy",
        num_cpus=data_cfg.decode_cpus,
    )


class BatchStream:
    """Exactly `batch_size` valid rows per batch from a Dataset or a worker's DataIterator shard;
    counts the rows it skipped (flagged bad) and the tail it dropped at the end of each epoch, and
    keeps the data positions it has consumed (those of the rows it handed out in batches and of
    the bad rows it skipped) until `take_consumed` collects them.

    Rows are buffered as references into the decoded blocks as Ray delivers them (zero-copy views
    of the object store). With `shuffle_buffer > 0` a batch is drawn once the buffer holds
    `shuffle_buffer + batch_size` rows: `batch_size` rows picked at random, seeded per epoch, and
    copied once into the batch. (Ray's `local_shuffle_buffer_size` concatenates and re-slices its
    buffer, copying each decoded image two to three times on the process that also trains.) With
    `shuffle_buffer = 0` rows keep their arrival order.

    A block stays pinned until its last row is drawn, so when the pinned blocks hold more than
    `COMPACT_AT` times the buffered rows, the buffered rows are copied into one block of their own
    (at most 1/(COMPACT_AT - 1) extra copies per row): memory stays within that factor of the
    buffer."""

    COMPACT_AT = 4

    def __init__(self, source, batch_size: int, shuffle_buffer: int = 0, seed: int = 0):
        self.source = source
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.rows_seen = 0
        self.rows_skipped = 0
        self.rows_dropped = 0
        self.skipped = dict.fromkeys(SKIP_REASONS[1:], 0)  # bad rows by reason
        self._problems: list[str] = []  # unreadable shards not yet collected by take_problems
        self._consumed: list[np.ndarray] = []
        self._reset()

    def _reset(self) -> None:
        self._blocks: dict[int, list] = {}  # key -> [columns, rows of it still buffered, rows pinned]
        self._slots: list[tuple[int, int]] = []  # the buffered rows: (block key, row)
        self._pinned = 0  # rows of all blocks still held
        self._keys = itertools.count()

    def epoch(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        """One pass over the source; `epoch` seeds the shuffle buffer's draws (training passes the
        data position the stream starts at)."""
        rng = np.random.default_rng(zlib.crc32(f"{self.seed}:{epoch}".encode()))
        self._reset()
        fill = self.shuffle_buffer + self.batch_size
        for block in self.source.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            valid = block.pop("valid")
            skip, problem = block.pop("skip", None), block.pop("problem", None)
            keep = np.flatnonzero(valid)
            if "position" in block and len(keep) < len(valid):
                self._consumed.append(block["position"][valid == 0].astype(np.int64))
            self.rows_seen += len(valid)
            self.rows_skipped += len(valid) - len(keep)
            if skip is not None and len(keep) < len(valid):
                self._count_skipped(skip, problem)
            if len(keep):
                self._add(block, len(valid), keep.tolist())
            while len(self._slots) >= fill:
                yield self._take(rng)
            if self._slots and self._pinned > self.COMPACT_AT * max(len(self._slots), fill):
                self._compact()
        while len(self._slots) >= self.batch_size:
            yield self._take(rng)
        self.rows_dropped += len(self._slots)
        self._reset()

    def _add(self, columns: dict[str, np.ndarray], rows: int, keep) -> None:
        key = next(self._keys)
        self._blocks[key] = [columns, len(keep), rows]
        self._pinned += rows
        self._slots.extend((key, row) for row in keep)

    def _compact(self) -> None:
        """Copy the buffered rows into one block of their own, releasing every block they pinned."""
        n = len(self._slots)
        columns = self._gather(self._slots)
        self._slots = []
        self._add(columns, n, range(n))

    def _take(self, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """Remove `batch_size` rows from the buffer (random ones when shuffling, else the oldest)."""
        slots = self._slots
        if self.shuffle_buffer:
            picked = []
            for _ in range(self.batch_size):
                i = int(rng.integers(len(slots)))
                picked.append(slots[i])
                slots[i] = slots[-1]
                slots.pop()
        else:
            picked = slots[: self.batch_size]
            del slots[: self.batch_size]
        batch = self._gather(picked)
        if "position" in batch:
            self._consumed.append(batch["position"].copy())
        return {k: torch.from_numpy(v) for k, v in batch.items()}

    def _gather(self, picked: list[tuple[int, int]]) -> dict[str, np.ndarray]:
        """Copy `picked` rows into new arrays, releasing each block whose last buffered row it was.
        The caller has already removed `picked` from the buffer (or replaces the whole buffer)."""
        columns = self._blocks[picked[0][0]][0]
        out = {k: np.empty((len(picked), *v.shape[1:]), v.dtype) for k, v in columns.items()}
        for j, (key, row) in enumerate(picked):
            entry = self._blocks[key]
            for k, v in entry[0].items():
                out[k][j] = v[row]
            entry[1] -= 1
            if entry[1] == 0:
                self._pinned -= entry[2]
                del self._blocks[key]
        return out

    def _count_skipped(self, skip: np.ndarray, problem: np.ndarray | None) -> None:
        codes, counts = np.unique(skip[skip > 0], return_counts=True)
        for code, count in zip(codes.tolist(), counts.tolist()):
            self.skipped[SKIP_REASONS[code]] += count
        if problem is not None:
            for message in {str(p) for p in problem[skip == SKIP_CODES[UNREADABLE]]}:
                if message not in self._problems:
                    self._problems.append(message)

    def take_problems(self) -> list[str]:
        """The unreadable shards met since the last call, one message each (the shard, what went
        wrong, how many samples it gave)."""
        out, self._problems = self._problems, []
        return out

    def take_consumed(self) -> np.ndarray:
        """The data positions consumed since the last call (int64, in the order consumed)."""
        out = np.concatenate(self._consumed) if self._consumed else np.zeros(0, np.int64)
        self._consumed = []
        return out

    def counters(self) -> dict[str, int]:
        skipped = {f"skipped_{reason.replace(' ', '_')}": n for reason, n in self.skipped.items()}
        return {
            "rows_seen": self.rows_seen,
            "rows_skipped": self.rows_skipped,
            "rows_dropped": self.rows_dropped,
            **skipped,
        }
