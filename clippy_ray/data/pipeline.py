"""Ray Data pipeline: parquet (local or s3://) -> decode + augment + tokenize in map_batches ->
fixed-size batches of valid rows on each training worker.

Bad rows (undecodable image, empty caption, missing value) are flagged `valid = 0` by the decode
step and dropped, and counted, where batches are assembled (`BatchStream`), so no row is lost
silently and every batch still has exactly `batch_size` rows (the gathered loss needs that).
"""

from __future__ import annotations

import functools
import itertools
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import ray
import torch
from ray.data import FileShuffleConfig

from clippy_ray import storage
from clippy_ray.config import DataConfig, TextConfig
from clippy_ray.data.schema import check_columns, image_bytes
from clippy_ray.data.transforms import load_image

FOOTER_READERS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"


@dataclass
class EpochFileShuffle(FileShuffleConfig):
    """File order seeded by (seed, epoch). Ray re-seeds with the execution index, which starts at
    0 in every new driver; offsetting it by `first_epoch` lets a resumed run replay the order the
    interrupted run would have seen from that epoch on."""

    first_epoch: int = 0

    def get_seed(self, execution_idx: int = 0) -> int | None:
        return hash((self.seed, self.first_epoch + execution_idx)) % (2**32)


def read_parquet(uri: str, columns: list[str], cfg: DataConfig, first_epoch: int = 0) -> ray.data.Dataset:
    """Parquet file or folder at `uri`, only `columns`, file order shuffled per epoch.
    Fails at once, naming the URI and the columns found, if the image or caption column is wrong."""
    fs, path = storage.resolve(uri)
    # Ray reads this when read_parquet builds its footer indexer (here, in this process); the
    # indexer then starts that many actors at the start of every epoch.
    previous = os.environ.get(FOOTER_READERS_ENV)
    os.environ[FOOTER_READERS_ENV] = str(cfg.footer_readers)
    try:
        ds = ray.data.read_parquet(
            path,
            filesystem=fs,
            num_cpus=cfg.read_cpus,
            shuffle=EpochFileShuffle(seed=cfg.seed, first_epoch=first_epoch),
        )
        schema = ds.schema()  # parquet footers only; nothing is decoded yet
    except OSError as err:
        raise storage.describe(uri, err) from None
    finally:
        if previous is None:
            os.environ.pop(FOOTER_READERS_ENV, None)
        else:
            os.environ[FOOTER_READERS_ENV] = previous
    check_columns(schema.base_schema, uri, cfg.image_column, cfg.caption_column)
    return ds.select_columns(columns)  # pushed down into the parquet read


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
    """One map_batches call: {image, caption} -> {image uint8 [N,3,S,S], input_ids, attention_mask,
    valid uint8 [N]}. Augmentation randomness is fresh per call in training, fixed in eval."""
    n = len(batch[caption_column])
    rng = np.random.default_rng(None if train else seed)
    images = np.zeros((n, 3, size, size), np.uint8)
    valid = np.zeros(n, np.uint8)
    captions = []
    for i in range(n):
        caption = batch[caption_column][i]
        caption = caption.strip() if isinstance(caption, str) else ""
        captions.append(caption)
        data = image_bytes(batch[image_column][i])
        if not caption or data is None:
            continue
        try:
            images[i] = load_image(data, size, train, rng, min_scale)
        except Exception:  # noqa: BLE001 - any undecodable image is a bad row, skipped and counted
            continue
        valid[i] = 1
    tokens = _tokenizer(text_cfg)(captions)
    return {
        "image": images,
        "input_ids": tokens["input_ids"],
        "attention_mask": tokens["attention_mask"],
        "valid": valid,
    }


def build_dataset(
    uri: str, data_cfg: DataConfig, text_cfg: TextConfig, image_size: int, train: bool, first_epoch: int = 0
) -> ray.data.Dataset:
    """The streaming dataset the training loop consumes (one row per input row, bad ones flagged)."""
    ds = read_parquet(uri, [data_cfg.image_column, data_cfg.caption_column], data_cfg, first_epoch)
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
    fn_kwargs = dict(
        image_column=data_cfg.image_column,
        caption_column=data_cfg.caption_column,
        size=image_size,
        train=train,
        min_scale=data_cfg.min_crop_scale,
        text_cfg=tuple(sorted((k, v) for k, v in vars(text_cfg).items() if k != "hf_config")),
        seed=data_cfg.seed,
    )
    return ds.map_batches(
        preprocess_batch,
        fn_kwargs=fn_kwargs,
        batch_size=data_cfg.decode_batch_size,
        batch_format="numpy",
        num_cpus=data_cfg.decode_cpus,
    )


class BatchStream:
    """Exactly `batch_size` valid rows per batch from a Dataset or a worker's DataIterator shard;
    counts the rows it skipped (flagged bad) and the tail it dropped at the end of each epoch.

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
        self._reset()

    def _reset(self) -> None:
        self._blocks: dict[int, list] = {}  # key -> [columns, rows of it still buffered, rows pinned]
        self._slots: list[tuple[int, int]] = []  # the buffered rows: (block key, row)
        self._pinned = 0  # rows of all blocks still held
        self._keys = itertools.count()

    def epoch(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        rng = np.random.default_rng(zlib.crc32(f"{self.seed}:{epoch}".encode()))
        self._reset()
        fill = self.shuffle_buffer + self.batch_size
        for block in self.source.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            valid = block.pop("valid")
            keep = np.flatnonzero(valid)
            self.rows_seen += len(valid)
            self.rows_skipped += len(valid) - len(keep)
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
        return {k: torch.from_numpy(v) for k, v in self._gather(picked).items()}

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

    def counters(self) -> dict[str, int]:
        return {"rows_seen": self.rows_seen, "rows_skipped": self.rows_skipped, "rows_dropped": self.rows_dropped}
