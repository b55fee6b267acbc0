"""Reading weight files that come from outside without running code from them.

A `torch.save` file is a pickle, and `torch.load(weights_only=False)` runs whatever a crafted one
names. Every file clippy-ray reads goes through here instead: safetensors (no code by design), or
`torch.load(weights_only=True)`, which builds tensors, plain containers and exactly the classes a
caller allows. The driver checks a file before any Ray work with `check_torch_file` /
`check_safetensors`: they read the pickle records or the header only (kilobytes, also on s3://).
No Ray, no DeepSpeed.
"""

from __future__ import annotations

import io
import json
import pickle
import pickletools
import re
import struct
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from clippy_ray import storage
from clippy_ray.errors import UserError

_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_REASON = re.compile(r"WeightsUnpickler error:\s*([^\n]+)")
_SAFETENSORS_HEADER_MAX = 100_000_000  # the format's own limit on the JSON header


class UnsafeFileError(UserError, ValueError):
    """A file that holds pickled code, or is not the format it claims; names the file and the fix."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _refused(source: str, names: Iterable[str], fix: str) -> UnsafeFileError:
    listed = ", ".join(sorted(names)) or "objects other than tensors"
    return UnsafeFileError(
        f"{source}: refused to load: the file holds pickled code ({listed}), and clippy-ray never runs code "
        f"from a file; {fix}"
    )


def _unreadable(source: str, err: BaseException, fix: str) -> UnsafeFileError:
    detail = _REASON.search(str(err))  # torch wraps the unpickler's reason in paragraphs of advice
    reason = detail.group(1).strip() if detail else _first_line(err)
    return UnsafeFileError(f"{source}: not a readable torch.save file of tensors ({reason}); {fix}")


def _torch_allowed() -> set[str]:
    """torch's own weights_only allowlist (what torch.serialization.get_unsafe_globals_in_checkpoint
    leaves out of its answer), as qualified names."""
    from torch import _weights_only_unpickler

    return set(_weights_only_unpickler._get_allowed_globals())


_STRINGS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}


def pickle_globals(path: str | Path) -> set[str]:
    """`module.name` of every class or function the pickles at the start of a file name, read
    statically with pickletools (nothing is built or run). Covers what torch's own scan cannot: a
    bare pickle in any protocol, and torch's legacy format (several pickles, then raw data)."""
    data, names, start = Path(path).read_bytes(), set(), 0
    while start < len(data):
        strings, memo, last, end = [], {}, None, None  # STACK_GLOBAL takes its names from strings pushed before
        try:
            for op, arg, pos in pickletools.genops(io.BytesIO(data[start:])):
                if op.name in _STRINGS:
                    strings.append(arg)
                    last = arg
                    continue
                if op.name == "MEMOIZE":
                    memo[len(memo)] = last
                elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[arg] = last
                elif op.name in ("GET", "BINGET", "LONG_BINGET") and isinstance(memo.get(arg), str):
                    strings.append(memo[arg])
                    last = memo[arg]
                    continue
                elif op.name in ("GLOBAL", "INST"):
                    names.add(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.add(f"{strings[-2]}.{strings[-1]}")
                elif op.name == "STOP":
                    end = start + pos + 1
                last = None
        except (ValueError, pickle.UnpicklingError, EOFError, IndexError):
            break  # raw tensor data after the pickles, or not a pickle at all
        if end is None:
            break
        start = end
    return names


def torch_load(path: str | Path, source: str, fix: str, allowed: Iterable[type] = (), map_location: Any = "cpu"):
    """`torch.load(path, weights_only=True)`, with exactly the classes in `allowed` on top of torch's
    own allowlist. A file naming anything else, or not a torch.save file at all, is an
    UnsafeFileError naming `source` with `fix`; nothing in it runs."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(str(path), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        names = set(_GLOBAL.findall(str(err))) or pickle_globals(path) - _torch_allowed()
        if names:
            raise _refused(source, names, fix) from None
        raise _unreadable(source, err, fix) from None
    except (RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile, struct.error) as err:
        raise _unreadable(source, err, fix) from None  # truncated, or not a torch.save file at all


def unsafe_globals(uri: str) -> list[str] | None:
    """The classes and functions a torch.save file at `uri` (local or s3://) names beyond torch's
    allowlist, read from its pickle records alone (no tensor data is read); None for a file in
    torch's legacy, non-zip format, which only a load can check."""
    fs, path = storage.resolve(uri)
    try:
        with fs.open_input_file(path) as handle:
            return torch.serialization.get_unsafe_globals_in_checkpoint(handle)
    except OSError as err:
        raise storage.describe(uri, err) from None
    except ValueError:
        return None  # not a zip: the legacy format (or not torch.save at all; the load says which)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as err:
        raise UnsafeFileError(f"{uri}: not a readable torch.save file ({_first_line(err)})") from None


def check_torch_file(uri: str, fix: str, allowed: Iterable[str] = ()) -> None:
    """Driver side: a torch.save file at `uri` names nothing beyond torch's allowlist and the
    qualified names in `allowed`, else an UnsafeFileError with `fix`. A legacy-format file is
    loaded safely instead (the pickle is not separable from its tensors there)."""
    names = unsafe_globals(uri)
    if names is None:
        torch_load(storage.fetch(uri), uri, fix)
        return
    extra = set(names) - set(allowed)
    if extra:
        raise _refused(uri, extra, fix)


def check_safetensors(uri: str, fix: str) -> None:
    """Driver side: `uri` (local or s3://) starts with a safetensors header (a length, then a JSON
    table of tensors that fits in the file); reads the header only."""
    fs, path = storage.resolve(uri)
    try:
        with fs.open_input_file(path) as handle:
            size = handle.size()
            head = handle.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            ok = 2 <= length <= min(size - 8, _SAFETENSORS_HEADER_MAX)
            table = json.loads(handle.read(length)) if ok else None
    except OSError as err:
        raise storage.describe(uri, err) from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        table = None
    if not isinstance(table, dict):
        raise UnsafeFileError(f"{uri}: not a safetensors file (no valid header); {fix}")


def load_safetensors(path: str | Path, source: str, fix: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a corrupt one is an UnsafeFileError naming `source`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise UnsafeFileError(f"{source}: not a readable safetensors file ({_first_line(err)}); {fix}") from None
