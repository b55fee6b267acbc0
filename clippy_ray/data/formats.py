"""The layouts image-text data comes in, read by the same pipeline: parquet, WebDataset `.tar`
shards (as img2dataset and OpenCLIP write them) and img2dataset's `files` output (folders of
`KEY.jpg` + `KEY.txt`). Detection, sample counts, and the readers that turn the sample ranges of
one shard into rows. No Ray.

A *shard* is a unit the plan orders and reads (a parquet file, a tar, a folder of files); a
sample's index in its shard (row, or key group in tar / name order) plus the shard's place in the
epoch is its data position, so WebDataset and files datasets resume exactly as parquet does.

WebDataset convention: a member `dir/KEY.EXT` belongs to the sample KEY (the name up to the first
dot of the basename); a sample is the run of consecutive members with one key. The image is its
`jpg`/`jpeg`/`png`/`webp` member, the caption its `txt` member, else the `caption_column` field
of its `json` member. Other members are ignored.
"""

from __future__ import annotations

import bisect
import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from clippy_ray import storage
from clippy_ray.config import DATA_FORMATS
from clippy_ray.data.schema import DataSchemaError, check_columns
from clippy_ray.errors import UserError

FORMATS = DATA_FORMATS
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp")  # img2dataset's parquet: `jpg`
CAPTION_COLUMNS = ("caption", "txt", "text")
UNREADABLE = "unreadable shard"  # the skip reason of the samples a truncated / unreadable shard lost


class FormatError(UserError, ValueError):
    """Data whose layout cannot be used; the message names the field, what was found and the fix."""


@dataclass(frozen=True)
class Layout:
    """What `detect` found at a URI: the format, its shards, the image and caption columns (parquet:
    column names; webdataset / files: the caption's json field when there is no txt member), and
    one line saying so."""

    format: str
    shards: tuple[str, ...]
    image_column: str
    caption_column: str
    note: str


# ------------------------------------------------------------------------------- naming


def expand(uri: str) -> list[str]:
    """OpenCLIP's shard lists: several URIs joined with `::`, each with brace patterns
    (`{00000..01023}` zero-padded ranges, `{a,b}` alternatives) expanded, in order."""
    out: list[str] = []
    for part in uri.split("::"):
        out.extend(_braces(part.strip()))
    return out


def _braces(text: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", text)
    if not m:
        return [text]
    head, body, tail = text[: m.start()], m.group(1), text[m.end() :]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = int(rng.group(1)), int(rng.group(2))
        width = len(rng.group(1)) if rng.group(1).startswith("0") else 0
        choices = [str(i).zfill(width) for i in range(lo, hi + 1)]
    else:
        choices = body.split(",")
    return [s for c in choices for s in _braces(head + c + tail)]


def is_list(uri: str) -> bool:
    return "::" in uri or re.search(r"\{[^{}]*\}", uri) is not None


def split_name(name: str) -> tuple[str, str]:
    """(key, extension) of a member: `a/b/000123.seg.png` -> (`a/b/000123`, `seg.png`)."""
    folder, _, base = name.rpartition("/")
    key, _, ext = base.partition(".")
    return (f"{folder}/{key}" if folder else key), ext.lower()


# ------------------------------------------------------------------------------- detection


def _where(field: str | None, uri: str) -> str:
    return f"{field}={uri}" if field else uri


def _stem(uri: str) -> str:
    return uri.rsplit("/", 1)[-1]


def detect(
    uri: str, field: str | None, fmt: str = "auto", image_column: str = "image", caption_column: str = "caption"
) -> Layout:
    """The layout at `uri` (a file, a folder / prefix, or a brace / `::` list of tar shards).
    `fmt` other than auto is checked, not guessed. One line naming `field=uri` when nothing usable
    is there."""
    if fmt not in FORMATS:
        raise FormatError(f"data.format: {fmt!r} is not one of {', '.join(FORMATS)}")
    if is_list(uri):
        shards = expand(uri)
        if fmt not in ("auto", "webdataset") or not all(s.endswith(".tar") for s in shards):
            raise FormatError(
                f"{_where(field, uri)}: a brace / `::` list names WebDataset .tar shards only "
                f"(expanded to {len(shards)} names, e.g. {_stem(shards[0])})"
            )
        for s in (shards[0], shards[-1]):
            storage.require(s, field, "fix the shard list (the first and last shards are looked for)")
        return _webdataset(field, uri, shards, caption_column, "a shard list")
    files = storage.list_files(uri, field)
    parquet = [f for f in files if f.endswith(".parquet")] or (files if files == [uri] and fmt == "parquet" else [])
    tars = [f for f in files if f.endswith(".tar")]
    images = [f for f in files if f.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS]
    found = {"parquet": parquet, "webdataset": tars, "files": images}
    if fmt == "auto":  # img2dataset writes a metadata .parquet (no images) beside its tars and folders
        if tars:
            fmt = "webdataset"
        elif images and not (parquet and _image_column(parquet[0])):
            fmt = "files"
        else:
            fmt = "parquet" if parquet else ""
    if not fmt or not found[fmt]:
        what = f"no {'.parquet files' if fmt == 'parquet' else '.tar shards' if fmt == 'webdataset' else 'images'}"
        seen = f" (found {len(files)} other files, e.g. {_stem(files[0])})" if files else " (it is empty)"
        raise FormatError(
            f"{_where(field, uri)}: {what if fmt else 'no parquet, .tar shards or image files'} there{seen}; point "
            f"{field or 'it'} at parquet, WebDataset .tar shards or img2dataset output (`clippy-ray data convert` "
            "turns a TSV of image paths into parquet)"
        )
    if fmt == "parquet":
        return _parquet(field, uri, parquet, image_column, caption_column)
    if fmt == "webdataset":
        return _webdataset(field, uri, tars, caption_column, "a folder")
    folders = sorted({f.rsplit("/", 1)[0] for f in images})
    return Layout(
        "files",
        tuple(folders),
        "",
        caption_column,
        f"{field or 'data'}: img2dataset files (KEY.jpg + KEY.txt) in {len(folders)} folder(s) at {uri}",
    )


def _image_column(parquet: str) -> str | None:
    """The first of IMAGE_COLUMNS a parquet file has (None if none, or not readable as parquet)."""
    fs, path = storage.resolve(parquet)
    try:
        with fs.open_input_file(path) as handle:
            names = pq.read_schema(handle).names
    except (OSError, pa.ArrowInvalid):
        return None
    return next((c for c in IMAGE_COLUMNS if c in names), None)


def _webdataset(field: str | None, uri: str, shards: list[str], caption_column: str, how: str) -> Layout:
    return Layout(
        "webdataset",
        tuple(shards),
        "",
        caption_column,
        f"{field or 'data'}: WebDataset, {len(shards)} .tar shard(s) from {how} (image: "
        f"{'/'.join(IMAGE_EXTENSIONS)}, caption: txt or json[{caption_column!r}])",
    )


def _parquet(field: str | None, uri: str, files: list[str], image_column: str, caption_column: str) -> Layout:
    """Parquet; when the configured columns are not there, img2dataset's (`jpg`, `caption`) or
    another common name is used, and the note says so."""
    fs, path = storage.resolve(files[0])
    try:
        with fs.open_input_file(path) as handle:
            schema = pq.read_schema(handle)
    except pa.ArrowInvalid as err:
        reason = str(err).strip().splitlines()[0]
        raise DataSchemaError(
            f"{_where(field, uri)}: {files[0]} is not a parquet file ({reason}); convert it with "
            "`clippy-ray data convert` or remove it"
        ) from None
    except OSError as err:
        raise storage.describe(files[0], err) from None
    names, chosen = schema.names, []
    if image_column not in names:
        alt = next((c for c in IMAGE_COLUMNS if c in names), None)
        if alt is not None:
            image_column = alt
            chosen.append(f"image column {alt!r}")
    if caption_column not in names:
        alt = next((c for c in CAPTION_COLUMNS if c in names), None)
        if alt is not None:
            caption_column = alt
            chosen.append(f"caption column {alt!r}")
    check_columns(schema, uri, image_column, caption_column)
    kind = "img2dataset parquet" if {"jpg", "key", "status"} <= set(names) else "parquet"
    note = f"{field or 'data'}: {kind}, {len(files)} file(s) at {uri}" + (
        f" ({', '.join(chosen)} detected)" if chosen else ""
    )
    return Layout("parquet", tuple(files), image_column, caption_column, note)


def check(layout: Layout, field: str | None, uri: str, look: int = 8) -> None:
    """WebDataset / files: the first shard reads, and one of its first `look` samples has an image
    and a caption (a layout none of whose samples can be used fails here, not after a stream of
    skipped rows). Parquet's columns were checked by `detect`."""
    if layout.format == "parquet":
        return
    first = layout.shards[0]
    members: list[str] = []
    if layout.format == "files":
        samples = [{e: b"" for e in paths} for _, paths in _folder_samples(first)[:look]]
        for sample, (_, paths) in zip(samples, _folder_samples(first)[:look]):
            sample.update({e: storage.read_bytes(paths[e]) for e in ("txt", "json") if e in paths})
    else:
        samples = []
        try:
            for _, sample in _tar_samples(first, stop=look, keep_names=members):
                samples.append(sample)
        except ShardError as err:
            if not samples:
                raise FormatError(
                    f"{_where(field, uri)}: {first} is not a readable tar ({err}); fix or remove it"
                ) from None
    if not any(_image(s) is not None and _caption(s, layout.caption_column) for s in samples):
        seen = sorted({e for s in samples for e in s}) or sorted({split_name(m)[1] for m in members})
        raise FormatError(
            f"{_where(field, uri)}: none of the first {len(samples)} samples of {first} has an image "
            f"({'/'.join(IMAGE_EXTENSIONS)}) and a caption (txt, or json[{layout.caption_column!r}]: set "
            f"data.caption_column to the json field); members found: {', '.join(seen) or 'none'}"
        )


def check_dataset(uri: str, field: str, image_column: str, caption_column: str, fmt: str = "auto") -> str:
    """Driver side, before any Ray work: `uri` holds data of a format the pipeline reads (parquet
    with usable image and caption columns, WebDataset shards or img2dataset files whose first
    samples have an image and a caption). One line names `field=uri` and what is wrong; returns
    the line saying what was detected."""
    layout = detect(uri, field, fmt, image_column, caption_column)
    check(layout, field, uri)
    return layout.note


# ------------------------------------------------------------------------------- counting


def shard_sizes(layout: Layout, problems: list[str] | None = None) -> tuple[list[int], str]:
    """(samples per shard, how they were counted); a shard found unreadable while counted is
    counted to its last whole sample and said in `problems`. Tar shards: OpenCLIP's `sizes.json` beside them,
    else img2dataset's `NNNNN_stats.json` (`successes`), else the shard's member headers are read
    (all of its bytes from object storage: write a sizes.json to skip that). Files folders: listed."""
    if layout.format == "files":
        return [len(_folder_samples(f)) for f in layout.shards], "listed"
    problems = problems if problems is not None else []
    sizes: dict[str, int] = {}
    for folder in sorted({s.rsplit("/", 1)[0] for s in layout.shards}):
        path = storage.join(folder, "sizes.json")
        if storage.exists(path):
            try:
                table = json.loads(storage.read_bytes(path))
                sizes.update({storage.join(folder, k): int(v) for k, v in table.items()})
            except (ValueError, TypeError, AttributeError):
                raise FormatError(f"{path}: not a {{shard name: samples}} JSON object; fix or remove it") from None
    out, how = [], set()
    for shard in layout.shards:
        if shard in sizes:
            out.append(sizes[shard])
            how.add("sizes.json")
            continue
        stats = shard[: -len(".tar")] + "_stats.json"
        if storage.exists(stats):
            try:
                out.append(int(json.loads(storage.read_bytes(stats))["successes"]))
                how.add("img2dataset's _stats.json")
                continue
            except (ValueError, KeyError, TypeError):
                pass  # not img2dataset's: count the shard itself
        try:
            out.append(sum(1 for _ in _tar_samples(shard, count_only=True)))
        except ShardError as err:  # its whole samples are the shard's; the rest is lost (said once)
            out.append(err.good)
            problems.append(f"{UNREADABLE}: {err}")
        how.add("shard headers read")
    return out, " and ".join(sorted(how))


# ------------------------------------------------------------------------------- reading


@dataclass
class Sample:
    index: int  # in its shard
    image: bytes | None
    caption: str | None
    skip: str = ""  # why it cannot be used, when the reader already knows (an unreadable shard)


def _caption(members: dict[str, bytes], caption_column: str) -> str | None:
    if "txt" in members:
        return members["txt"].decode("utf-8", errors="replace")
    if "json" in members:
        try:
            value = json.loads(members["json"]).get(caption_column)
        except (ValueError, AttributeError):
            return None
        return value if isinstance(value, str) else None
    return None


def _image(members: dict[str, bytes]) -> bytes | None:
    return next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)


def _tar_samples(
    uri: str, count_only: bool = False, stop: int | None = None, keep_names: list | None = None
) -> Iterator[tuple[int, dict]]:
    """(index, {extension: bytes}) of each sample of a tar shard, streamed in order (member data is
    not kept with `count_only`), until sample `stop`. A shard that ends early or cannot be read
    raises ShardError after the samples read before it."""
    fs, path = storage.resolve(uri)
    index, key, members = -1, None, {}
    try:
        size = fs.get_file_info(path).size
        with fs.open_input_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                k, ext = split_name(info.name)
                if keep_names is not None:
                    keep_names.append(info.name)
                if k != key:
                    if key is not None:
                        yield index, members
                    index, key, members = index + 1, k, {}
                    if stop is not None and index >= stop:
                        return
                if count_only:
                    continue
                if ext in (*IMAGE_EXTENSIONS, "txt", "json"):
                    handle = tar.extractfile(info)
                    members[ext] = handle.read() if handle is not None else b""
                else:
                    members.setdefault(ext, None)  # another member: its name only (for messages)
            # tarfile takes a missing or cut end-of-archive block for the end: a whole archive has
            # one (512 zero bytes) where its last header would be
            if size is not None and size < tar.offset + tarfile.BLOCKSIZE:
                raise tarfile.ReadError("truncated (no end-of-archive block)")
            if key is not None:
                yield index, members
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ShardError(uri, max(index, 0), err) from None  # samples before `index` were whole


class ShardError(Exception):
    """A shard that ended early or could not be read, after `good` samples."""

    def __init__(self, uri: str, good: int, err: BaseException):
        super().__init__(f"{uri}: {str(err).strip() or type(err).__name__} after {good} sample(s)")
        self.uri, self.good = uri, good


def _folder_samples(folder: str) -> list[tuple[str, dict[str, str]]]:
    """(key, {extension: file URI}) of each sample of an img2dataset `files` folder, by key."""
    samples: dict[str, dict[str, str]] = {}
    for f in storage.list_files(folder):
        rel = f[len(folder) :].lstrip("/")
        if "/" in rel:
            continue  # a sub-folder is a shard of its own
        key, ext = split_name(rel)
        if ext in (*IMAGE_EXTENSIONS, "txt", "json"):
            samples.setdefault(key, {})[ext] = f
    return sorted(samples.items())


def read_samples(
    layout_format: str, uri: str, ranges: list[tuple[int, int]], rows: int, caption_column: str
) -> Iterator[Sample]:
    """The samples of one shard whose index is in `ranges` (ascending, disjoint), in index order.
    `rows` is the shard's counted size: samples past it are not read; samples the shard lost (it
    ends early, or cannot be read) come out with `skip` saying so, so every position in `ranges`
    below `rows` comes out exactly once."""
    wanted = [(lo, min(hi, rows)) for lo, hi in ranges if lo < rows]
    if not wanted:
        return
    stop = wanted[-1][1]

    starts = [lo for lo, _ in wanted]

    def inside(i: int) -> bool:  # (a resumed shard can have many ranges: a search, not a scan)
        k = bisect.bisect_right(starts, i) - 1
        return k >= 0 and i < wanted[k][1]

    if layout_format == "files":
        for i, (_, paths) in enumerate(_folder_samples(uri)[:stop]):
            if inside(i):
                image = next((paths[e] for e in IMAGE_EXTENSIONS if e in paths), None)
                members = {e: storage.read_bytes(paths[e]) for e in ("txt", "json") if e in paths}
                yield Sample(i, storage.read_bytes(image) if image else None, _caption(members, caption_column))
        return
    done = 0
    try:
        for i, members in _tar_samples(uri, stop=stop):
            done = i + 1
            if inside(i):
                yield Sample(i, _image(members), _caption(members, caption_column))
    except ShardError as err:
        reason = f"{UNREADABLE}: {err}"
        for lo, hi in wanted:
            for i in range(max(lo, err.good), hi):
                yield Sample(i, None, None, reason)
        return
    for lo, hi in wanted:  # a shard shorter than its count (sizes.json said more)
        for i in range(max(lo, done), hi):
            yield Sample(i, None, None, f"{UNREADABLE}: {uri} has {done} samples, counted {rows}")
