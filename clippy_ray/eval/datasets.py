"""Evaluation datasets: the offline benchmark's parquet and the folder layouts users already have
(PASCAL VOC, ADE20K, Waterbirds), local or s3://. No Ray here.

A dataset is opened once on the driver (`open_eval_set`: listing only, cheap) into shards of row
references; workers decode a shard with `load_shard`. Label maps use 255 for "not scored".
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from importlib import resources

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from clippy_ray import storage
from clippy_ray.data import benchmark
from clippy_ray.data.schema import image_bytes
from clippy_ray.data.transforms import open_rgb
from clippy_ray.errors import InputError, UserError
from clippy_ray.eval.metrics import IGNORE

FORMATS = ("benchmark", "voc", "ade20k", "waterbirds", "parquet")


class EvalDataError(UserError, ValueError):
    """A dataset that cannot serve the requested evaluation; the message names the fix."""


@dataclass
class Sample:
    key: str
    image: np.ndarray  # uint8 [H, W, 3]
    mask: np.ndarray | None = None  # int [H, W] class id per pixel, 255 = not scored
    instances: np.ndarray | None = None  # int [H, W] segment id per pixel (0 = background), 255 = not scored
    labels: list[int] = field(default_factory=list)  # class ids present (classification target)
    group: int | None = None  # context (background family / place) id, for the robustness picture


@dataclass(frozen=True)
class FileRow:
    key: str
    image: str  # URI
    mask: str | None = None
    instances: str | None = None
    label: int | None = None
    group: int | None = None


@dataclass(frozen=True)
class Shard:
    """A unit of parallel work: rows [start, stop) of one parquet file, or a list of file rows."""

    index: int
    fmt: str
    uri: str | None = None
    start: int = 0
    stop: int = 0
    rows: tuple[FileRow, ...] = ()


@dataclass
class EvalSet:
    fmt: str
    uri: str
    class_names: list[list[str]]  # synonyms per class id
    has_background: bool  # class id 0 is "background"
    default_background: str  # segmentation background mode when eval.background is auto
    templates: str  # the template set that suits the data
    splits: dict[str, list[Shard]]  # "eval" (cls, seg, unsup), "matched" and "swapped" (robust)
    context_names: list[list[str]] = field(default_factory=list)  # backgrounds / places
    has_instances: bool = False
    has_masks: bool = True

    def tasks_supported(self) -> dict[str, str | None]:
        """task -> None if it can run, else why not."""
        why = {"cls": None, "seg": None, "unsup": None, "robust": None}
        if not self.has_masks:
            why["seg"] = why["unsup"] = f"{self.fmt} data has no segmentation masks"
        if "matched" not in self.splits:
            why["robust"] = (
                f"{self.fmt} data has no matched/swapped background splits "
                "(benchmark test-matched/test-swapped, or Waterbirds metadata.csv)"
            )
        if "eval" not in self.splits:
            why["cls"] = why["seg"] = why["unsup"] = f"{self.fmt} data has no evaluation split"
        return why


# ------------------------------------------------------------------------------- names


def read_names(name_or_path: str, package_dir: str = "classes") -> list[list[str]]:
    """Lines of a shipped file (`voc21`, `ade150`, `coco133`, ...) or of a text file; `#` starts a
    comment line; commas separate synonyms."""
    if "/" not in name_or_path and not name_or_path.endswith(".txt"):
        ref = resources.files("clippy_ray.eval").joinpath(package_dir, f"{name_or_path}.txt")
        if not ref.is_file():
            shipped = sorted(p.name[:-4] for p in resources.files("clippy_ray.eval").joinpath(package_dir).iterdir())
            raise EvalDataError(
                f"no shipped {package_dir} file {name_or_path!r}; shipped: {', '.join(shipped)} "
                f"(or give a path to a .txt file)"
            )
        text = ref.read_text()
    else:
        text = storage.fetch(name_or_path).read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [[part.strip() for part in line.split(",") if part.strip()] for line in lines]


def fill(template: str, name: str) -> str:
    """`template` with `name` in its {}, the article before it agreeing: "a {}" + "arrow" ->
    "an arrow" (by the first letter: a, e, i, o, u)."""
    if name[:1].lower() in "aeiou":
        template = re.sub(r"\b([Aa]) \{\}", r"\1n {}", template)
    return template.format(name)


def read_templates(name_or_path: str) -> list[str]:
    templates = [", ".join(parts) for parts in read_names(name_or_path, "templates")]
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise EvalDataError(
            f"eval.templates={name_or_path!r}: every template needs a {{}} for the class name; bad: {bad[0]!r}"
        )
    return templates


def benchmark_class_names() -> list[list[str]]:
    background = ["background"] + [f"{w} background" for w in benchmark.BACKGROUND_WORDS.values()]
    return [background] + [[c] for c in benchmark.CLASSES[1:]]


# ------------------------------------------------------------------------------- listing


def _list(uri: str, suffixes: tuple[str, ...]) -> list[str]:
    """URIs of the files under `uri` (recursively) ending in one of `suffixes`, sorted."""
    return [f for f in storage.list_files(uri) if f.lower().endswith(suffixes)]


def _read_bytes(uri: str) -> bytes:
    fs, path = storage.resolve(uri)
    with fs.open_input_file(path) as f:
        return f.read()


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _parquet_shards(uri: str, fmt: str, rows_per_shard: int, max_rows: int | None) -> list[Shard]:
    files = _list(uri, (".parquet",))
    if not files:
        raise EvalDataError(f"{uri}: no .parquet files")
    shards, taken = [], 0
    for f in files:
        fs, path = storage.resolve(f)
        try:
            with fs.open_input_file(path) as handle:
                n = pq.ParquetFile(handle).metadata.num_rows
        except pa.ArrowInvalid as err:
            raise EvalDataError(
                f"--data={uri}: {f} is not a parquet file ({str(err).strip().splitlines()[0]})"
            ) from None
        except OSError as err:
            raise storage.describe(f, err) from None
        for start in range(0, n, rows_per_shard):
            stop = min(n, start + rows_per_shard)
            if max_rows is not None:
                stop = min(stop, start + max_rows - taken)
            if stop <= start:
                break
            shards.append(Shard(len(shards), fmt, uri=f, start=start, stop=stop))
            taken += stop - start
        if max_rows is not None and taken >= max_rows:
            break
    return shards


def _file_shards(rows: list[FileRow], fmt: str, rows_per_shard: int, max_rows: int | None) -> list[Shard]:
    rows = rows[:max_rows] if max_rows is not None else rows
    return [Shard(i, fmt, rows=tuple(chunk)) for i, chunk in enumerate(_chunks(rows, rows_per_shard))]


# ------------------------------------------------------------------------------- formats


def detect_format(uri: str) -> str:
    if storage.exists(storage.join(uri, "benchmark.json")):
        return "benchmark"
    if storage.exists(storage.join(uri, "metadata.csv")):
        return "waterbirds"
    for voc in ("", "VOC2012", "VOCdevkit/VOC2012"):
        if storage.exists(
            storage.join(uri, voc, "SegmentationClass") if voc else storage.join(uri, "SegmentationClass")
        ):
            return "voc"
    for ade in ("", "ADEChallengeData2016"):
        if storage.exists(
            storage.join(uri, ade, "annotations", "validation")
            if ade
            else storage.join(uri, "annotations", "validation")
        ):
            return "ade20k"
    return "parquet"


def open_eval_set(
    uri: str, fmt: str = "auto", rows_per_shard: int = 32, max_rows: int | None = None, classes: str | None = None
) -> EvalSet:
    """List a dataset into shards. `fmt` one of FORMATS or auto (detected from the layout);
    `classes` names the class file for plain parquet (or overrides a format's own)."""
    storage.require(uri, "--data")
    fmt = detect_format(uri) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise EvalDataError(f"--format {fmt!r} is not one of auto, {', '.join(FORMATS)}")
    args = (rows_per_shard, max_rows)
    if fmt == "benchmark":
        splits = {"eval": _parquet_shards(storage.join(uri, "val"), fmt, *args)}
        if storage.exists(storage.join(uri, "test-matched")) and storage.exists(storage.join(uri, "test-swapped")):
            splits["matched"] = _parquet_shards(storage.join(uri, "test-matched"), fmt, *args)
            splits["swapped"] = _parquet_shards(storage.join(uri, "test-swapped"), fmt, *args)
        return EvalSet(
            fmt,
            uri,
            read_names(classes) if classes else benchmark_class_names(),
            True,
            "class",
            "benchmark",
            splits,
            [[f"{w} background"] for w in benchmark.BACKGROUND_WORDS.values()],
            has_instances=True,
        )
    if fmt == "voc":
        return _open_voc(uri, classes, *args)
    if fmt == "ade20k":
        return _open_ade(uri, classes, *args)
    if fmt == "waterbirds":
        return _open_waterbirds(uri, classes, *args)
    if not classes:
        raise EvalDataError(
            f"{uri}: plain parquet needs --classes FILE (one class name per line, line 0 = "
            f"background if the masks use 0 for it)"
        )
    names = read_names(classes)
    has_bg = names[0][0].lower() == "background"
    return EvalSet(
        fmt,
        uri,
        names,
        has_bg,
        "class" if has_bg else "none",
        "clip",
        {"eval": _parquet_shards(uri, fmt, *args)},
        has_instances=True,
    )


def _voc_root(uri: str) -> str:
    for sub in ("", "VOC2012", "VOCdevkit/VOC2012"):
        root = storage.join(uri, sub) if sub else uri
        if storage.exists(storage.join(root, "SegmentationClass")):
            return root
    raise EvalDataError(f"{uri}: not a PASCAL VOC folder (no SegmentationClass/)")


def _open_voc(uri: str, classes: str | None, rows_per_shard: int, max_rows: int | None) -> EvalSet:
    root = _voc_root(uri)
    ids_uri = storage.join(root, "ImageSets", "Segmentation", "val.txt")
    if not storage.exists(ids_uri):
        raise EvalDataError(f"{root}: no ImageSets/Segmentation/val.txt listing the evaluation images")
    ids = [line.strip() for line in _read_bytes(ids_uri).decode().splitlines() if line.strip()]
    has_instances = storage.exists(storage.join(root, "SegmentationObject"))
    rows = [
        FileRow(
            i,
            storage.join(root, "JPEGImages", f"{i}.jpg"),
            storage.join(root, "SegmentationClass", f"{i}.png"),
            storage.join(root, "SegmentationObject", f"{i}.png") if has_instances else None,
        )
        for i in ids
    ]
    return EvalSet(
        "voc",
        uri,
        read_names(classes or "voc21"),
        True,
        "threshold",
        "clip",
        {"eval": _file_shards(rows, "voc", rows_per_shard, max_rows)},
        has_instances=has_instances,
    )


def _open_ade(uri: str, classes: str | None, rows_per_shard: int, max_rows: int | None) -> EvalSet:
    root = (
        uri
        if storage.exists(storage.join(uri, "annotations", "validation"))
        else storage.join(uri, "ADEChallengeData2016")
    )
    masks = _list(storage.join(root, "annotations", "validation"), (".png",))
    rows = []
    for m in masks:
        name = m.rsplit("/", 1)[-1][:-4]
        rows.append(FileRow(name, storage.join(root, "images", "validation", f"{name}.jpg"), m))
    return EvalSet(
        "ade20k",
        uri,
        read_names(classes or "ade150"),
        False,
        "none",
        "clip",
        {"eval": _file_shards(rows, "ade20k", rows_per_shard, max_rows)},
    )


def _open_waterbirds(uri: str, classes: str | None, rows_per_shard: int, max_rows: int | None) -> EvalSet:
    text = _read_bytes(storage.join(uri, "metadata.csv")).decode()
    reader = csv.DictReader(io.StringIO(text))
    need = {"img_filename", "y", "split", "place"}
    if not need <= set(reader.fieldnames or ()):
        raise EvalDataError(f"{uri}/metadata.csv: needs columns {', '.join(sorted(need))}; found {reader.fieldnames}")
    rows = [
        FileRow(r["img_filename"], storage.join(uri, r["img_filename"]), label=int(r["y"]), group=int(r["place"]))
        for r in reader
        if r["split"].strip() == "2"
    ]  # the test split
    if not rows:
        raise EvalDataError(f"{uri}/metadata.csv: no rows with split == 2 (the test split)")
    matched = [r for r in rows if r.label == r.group]
    swapped = [r for r in rows if r.label != r.group]
    args = (rows_per_shard, max_rows)
    return EvalSet(
        "waterbirds",
        uri,
        read_names(classes or "waterbirds"),
        False,
        "none",
        "clip",
        {
            "eval": _file_shards(rows, "waterbirds", *args),
            "matched": _file_shards(matched, "waterbirds", *args),
            "swapped": _file_shards(swapped, "waterbirds", *args),
        },
        read_names("waterbirds_places"),
        has_masks=False,
    )


# ------------------------------------------------------------------------------- decoding


def decode_rgb(data: bytes) -> np.ndarray:
    return np.asarray(open_rgb(data))


def read_image(uri: str) -> np.ndarray:
    """The RGB image at `uri` (local or s3://) as uint8 [H, W, 3]; a file PIL cannot decode is an
    InputError naming it."""
    data = storage.fetch(uri).read_bytes()
    try:
        return decode_rgb(data)
    except UnidentifiedImageError:  # its message names an in-memory buffer, not the file
        raise InputError(f"{uri}: not an image (no format PIL knows); give a JPEG or PNG file") from None
    except (OSError, SyntaxError, ValueError) as err:  # what PIL's decoders raise on a damaged file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{uri}: not a readable image ({reason}); give a JPEG or PNG file") from None


def decode_labels(data: bytes) -> np.ndarray:
    """A label map PNG (palette or grey) -> its indices, not its colours."""
    img = Image.open(io.BytesIO(data))
    if img.mode not in ("P", "L", "I", "I;16"):
        raise EvalDataError(f"label map PNG has mode {img.mode}; expected indices (palette or greyscale)")
    return np.asarray(img).astype(np.int64)


def _labels_from_mask(mask: np.ndarray, has_background: bool) -> list[int]:
    ids = np.unique(mask[mask != IGNORE])
    return [int(i) for i in ids if not (has_background and i == 0)]


def _read_rows(uri: str, start: int, stop: int, cache: dict | None = None):
    """Rows [start, stop) of a parquet file, reading only the row groups that hold them. `cache`
    (a worker's own dict) keeps the last row groups read: a worker's next shard mostly falls in
    them, and a file written with one row group is then read once per worker, not once per shard."""
    fs, path = storage.resolve(uri)
    parquet = pq.ParquetFile(path, filesystem=fs)  # reads the footer only
    meta = parquet.metadata
    groups, offset, first = [], 0, None
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        if offset < stop and offset + n > start:
            groups.append(g)
            first = offset if first is None else first
        offset += n
    key = (uri, tuple(groups))
    table = cache.get(key) if cache is not None else None
    if table is None:
        table = parquet.read_row_groups(groups)
        if cache is not None:
            cache.clear()
            cache[key] = table
    return table.slice(start - (first or 0), stop - start)


def load_shard(shard: Shard, has_background: bool = True, cache: dict | None = None) -> list[Sample]:
    """Decode the rows of a shard (`cache`: see `_read_rows`)."""
    if shard.fmt in ("benchmark", "parquet"):
        table = _read_rows(shard.uri, shard.start, shard.stop, cache)
        cols = table.to_pydict()
        out = []
        for i in range(table.num_rows):
            mask = decode_labels(cols["mask"][i]) if cols.get("mask") and cols["mask"][i] else None
            inst = (
                decode_labels(cols["instance_mask"][i])
                if cols.get("instance_mask") and cols["instance_mask"][i]
                else None
            )
            labels = (
                list(cols["labels"][i])
                if cols.get("labels")
                else (_labels_from_mask(mask, has_background) if mask is not None else [])
            )
            group = None
            if cols.get("background") and cols["background"][i] in benchmark.BACKGROUNDS:
                group = benchmark.BACKGROUNDS.index(cols["background"][i])
            key = cols["key"][i] if cols.get("key") else f"{shard.uri}#{shard.start + i}"
            out.append(Sample(key, decode_rgb(image_bytes(cols["image"][i])), mask, inst, labels, group))
        return out
    out = []
    for row in shard.rows:
        image = decode_rgb(_read_bytes(row.image))
        mask = decode_labels(_read_bytes(row.mask)) if row.mask else None
        if mask is not None and shard.fmt == "ade20k":  # 0 = "other" is not scored; 1..150 -> 0..149
            mask = np.where(mask == 0, IGNORE, mask - 1)
        inst = decode_labels(_read_bytes(row.instances)) if row.instances else None
        if row.label is not None:
            labels = [row.label]
        else:
            labels = _labels_from_mask(mask, has_background) if mask is not None else []
        out.append(Sample(row.key, image, mask, inst, labels, row.group))
    return out
