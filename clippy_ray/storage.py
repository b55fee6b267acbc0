"""Storage addressed by URI: a local path or `s3://bucket/prefix`.

Endpoints and credentials come from the environment (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_REGION`), never from configs; nothing here logs or returns them.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from clippy_ray.errors import UserError

S3_MAX_ATTEMPTS = 5  # bounded retries for transient S3 failures (AWS standard retry strategy)


class StorageError(UserError, RuntimeError):
    """A storage location that cannot be used, with the URI and what to check."""


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


@functools.lru_cache(maxsize=64)
def _resolved_region(bucket: str) -> str:
    return pafs.resolve_s3_region(bucket)  # raises, so a passing failure is not cached


def bucket_region(bucket: str) -> str:
    """The AWS region a bucket lives in (one HEAD request), us-east-1 if it cannot be asked: a
    client pointed at the wrong region gets HTTP 301 for every request."""
    try:
        return _resolved_region(bucket)
    except (OSError, ValueError):
        return "us-east-1"


def s3_filesystem(endpoint: str | None = None, bucket: str | None = None) -> pafs.S3FileSystem:
    """An S3 filesystem configured from the environment (or an explicit endpoint URL). The region:
    AWS_REGION / AWS_DEFAULT_REGION, else (on AWS itself) the region `bucket` lives in."""
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    kwargs: dict = {
        "region": region or (bucket_region(bucket) if bucket and not endpoint else "us-east-1"),
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS),
        "connect_timeout": 10,
        "request_timeout": 60,
    }
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme or "https"
    # Credentials: pyarrow's default AWS chain reads them from the environment / instance role.
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """URI -> (pyarrow filesystem, path inside it). `s3://b/k` -> (S3, "b/k")."""
    uri = str(uri)
    if is_s3(uri):
        path = uri[len("s3://") :].rstrip("/")
        if not path or path[0] == "/":
            raise StorageError(f"{uri}: expected s3://bucket/key")
        return s3_filesystem(bucket=path.split("/", 1)[0]), path
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"{uri}: unsupported scheme; use a local path or s3://bucket/prefix")
    return pafs.LocalFileSystem(), os.path.abspath(uri.removeprefix("file://"))


def ray_storage(uri: str) -> tuple[str, pafs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray's RunConfig and Result.from_path: with a
    filesystem, Ray wants bucket/prefix."""
    if is_s3(uri):
        return resolve(uri)[1], resolve(uri)[0]
    return os.path.abspath(uri), None


def _hint(uri: str) -> str:
    if not is_s3(uri):
        return ""
    return (
        " Check the bucket exists, AWS_ENDPOINT_URL points at the S3 server, and"
        " AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY allow access."
    )


_AWS_ERROR = re.compile(r"AWS Error (\w+) during (\w+) operation")
_DENIED = ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "UNKNOWN (HTTP status 403)")


def _bucket(uri: str) -> str:
    return uri[len("s3://") :].split("/", 1)[0]


def missing(uri: str) -> str:
    """Why nothing is at `uri`: no such file, no such bucket, or no such key or prefix in a bucket
    that exists (pyarrow's own message for all three is the bare path)."""
    if not is_s3(uri):
        return "no such file or folder"
    bucket = _bucket(uri)
    try:
        found = s3_filesystem(bucket=bucket).get_file_info(bucket).type != pafs.FileType.NotFound
    except OSError:
        found = True  # the bucket cannot be asked about; say what is known
    if not found:
        return f"no such bucket {bucket!r}"
    return f"no such object or prefix (bucket {bucket!r} exists)"


def not_found(uri: str, field: str | None = None, fix: str | None = None) -> StorageError:
    """A StorageError for nothing at `uri`: `field=uri` (or the URI), why (`missing`), and `fix`
    (default: check the bucket name and endpoint, or the path)."""
    reason = missing(uri)
    fix = fix or (
        "check the bucket name and AWS_ENDPOINT_URL" if reason.startswith("no such bucket") else "check the path"
    )
    return StorageError(f"{f'{field}={uri}' if field else uri}: {reason}; {fix}")


def describe(uri: str, err: Exception) -> StorageError:
    """A StorageError naming `uri` and the reason kept from `err`: missing (which part), access
    denied, or the first line of pyarrow's message with what to check on S3."""
    if isinstance(err, FileNotFoundError):  # pyarrow's message is only the path
        return not_found(uri)
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    aws = _AWS_ERROR.search(first_line)
    if any(code in first_line for code in _DENIED):
        during = f" (AWS Error {aws.group(1)} during {aws.group(2)})" if aws else ""
        return StorageError(
            f"{uri}: access denied{during}; check that AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY may use it"
        )
    if aws and aws.group(1) == "NO_SUCH_BUCKET":
        return not_found(uri)
    return StorageError(f"{uri}: {first_line}.{_hint(uri)}")


def info(uri: str) -> pafs.FileInfo:
    fs, path = resolve(uri)
    try:
        return fs.get_file_info(path)
    except OSError as err:
        raise describe(uri, err) from None


def exists(uri: str) -> bool:
    return info(uri).type != pafs.FileType.NotFound


def require(uri: str, field: str | None = None, fix: str | None = None) -> pafs.FileInfo:
    """`uri`'s FileInfo, or `not_found(uri, field, fix)`."""
    fi = info(uri)
    if fi.type == pafs.FileType.NotFound:
        raise not_found(uri, field, fix)
    return fi


def require_bucket(uri: str, field: str) -> None:
    """Where output goes: an s3:// URI's bucket exists (a local folder is made when written)."""
    resolve(uri)  # a scheme other than a local path or s3://: one line
    if is_s3(uri):
        bucket = f"s3://{_bucket(uri)}"
        if not exists(bucket):
            raise StorageError(f"{field}={uri}: bucket {bucket} not found; create it or fix the URI")


def list_files(uri: str, field: str | None = None) -> list[str]:
    """The URIs of the files at `uri`: itself if it is a file, else every file under it (recursively),
    sorted. Missing or unreadable: a StorageError naming `field=uri` with the reason."""
    fi = require(uri, field)
    if fi.type == pafs.FileType.File:
        return [uri]
    fs, path = resolve(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except OSError as err:
        raise describe(uri, err) from None
    return sorted(join(uri, i.path[len(path) :].lstrip("/")) for i in infos if i.type == pafs.FileType.File)


def join(uri: str, *parts: str) -> str:
    return "/".join([str(uri).rstrip("/"), *[p.strip("/") for p in parts]])


def cache_dir() -> Path:
    return Path(os.environ.get("CLIPPY_RAY_CACHE", Path.home() / ".cache" / "clippy-ray"))


def fetch(uri: str) -> Path:
    """A local path holding `uri` (a file or a folder). Local URIs are returned as they are;
    S3 objects are downloaded once into the cache, keyed by URI, size and modification time."""
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        if not os.path.exists(path):
            raise not_found(uri)
        return Path(path)
    fi = require(uri)
    stamp = f"{uri}|{fi.size}|{fi.mtime_ns}|{fi.type}"
    key = hashlib.sha256(stamp.encode()).hexdigest()[:24]
    target = cache_dir() / key / os.path.basename(path)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".partial-"))
    try:
        if fi.type == pafs.FileType.Directory:
            (tmp / "x").mkdir()
        pafs.copy_files(path, str(tmp / "x"), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        try:
            os.replace(tmp / "x", target)  # atomic: a concurrent reader sees all or nothing
        except OSError:
            if not target.exists():
                raise
    except OSError as err:
        raise describe(uri, err) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def upload(local: str | os.PathLike, uri: str) -> None:
    """Copy a local file or folder to `uri` (local or s3)."""
    fs, path = resolve(uri)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            fs.create_dir(os.path.dirname(path), recursive=True)
        pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    except OSError as err:
        raise describe(uri, err) from None


def write_bytes(uri: str, data: bytes) -> None:
    """Write one file at `uri` (local or s3), creating local parent folders."""
    fs, path = resolve(uri)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            fs.create_dir(os.path.dirname(os.path.abspath(path)), recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(data)
    except OSError as err:
        raise describe(uri, err) from None


def read_bytes(uri: str) -> bytes:
    """The contents of one file at `uri` (local or s3), read now (no cache)."""
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except (OSError, FileNotFoundError) as err:
        raise describe(uri, err) from None
