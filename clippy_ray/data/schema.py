"""Parquet columns of image-text datasets.

Required: an image column holding encoded JPEG/PNG bytes, either plain binary or the struct that
Hugging Face `datasets` writes for an Image feature ({bytes, path}), and a caption column (name
configurable). Optional: key, mask (PNG label map), instance_mask, labels, background, split.
"""

from __future__ import annotations

import pyarrow as pa

from clippy_ray.errors import UserError


class DataSchemaError(UserError, ValueError):
    """A dataset whose columns cannot be used; the message lists the columns found."""


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def check_columns(
    schema: pa.Schema,
    uri: str,
    image_column: str,
    caption_column: str,
    image_field: str = "data.image_column",
    caption_field: str = "data.caption_column",
) -> None:
    """Fail with one line if the image or caption column is missing or of the wrong type."""
    found = ", ".join(f"{f.name} ({f.type})" for f in schema)
    names = schema.names
    if image_column not in names:
        raise DataSchemaError(f"{uri}: no image column {image_column!r} (set {image_field}); columns found: {found}")
    itype = schema.field(image_column).type
    struct_ok = pa.types.is_struct(itype) and any(
        itype.field(i).name == "bytes" and _is_binary(itype.field(i).type) for i in range(itype.num_fields)
    )
    if not (_is_binary(itype) or struct_ok):
        raise DataSchemaError(
            f"{uri}: image column {image_column!r} is {itype}; expected encoded image bytes "
            f"(binary) or a {{bytes, path}} struct; columns found: {found}"
        )
    if caption_column not in names:
        raise DataSchemaError(
            f"{uri}: no caption column {caption_column!r} (set {caption_field}); columns found: {found}"
        )
    if not _is_string(schema.field(caption_column).type):
        raise DataSchemaError(
            f"{uri}: caption column {caption_column!r} is {schema.field(caption_column).type}; "
            f"expected strings; columns found: {found}"
        )


def image_bytes(value) -> bytes | None:
    """Encoded bytes of one image cell: plain bytes or an HF {bytes, path} struct; None if absent."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if value is None or len(value) == 0:
        return None
    return bytes(value)
