"""The configuration reference (docs/config.md), made from the config dataclasses and the comments
their fields carry in clippy_ray/config.py: every key, its type, default and meaning. No Ray."""

from __future__ import annotations

import dataclasses
import inspect
import io
import textwrap
import tokenize
import typing

from clippy_ray import config

SECTIONS = (
    ("model", config.ModelConfig),
    ("model.image", config.ImageConfig),
    ("model.text", config.TextConfig),
    ("loss", config.LossConfig),
    ("data", config.DataConfig),
    ("train", config.TrainConfig),
    ("train.wandb", config.WandbConfig),
    ("eval", config.EvalConfig),
    ("eval.during_training", config.DuringTrainingConfig),
)


def field_comments(cls: type, source: str | None = None) -> dict[str, str]:
    """{field: its description}: the comment at the end of the field's line and the comment lines
    under it that continue it (aligned under it: "#" and a run of spaces), else the comment lines
    right above it."""
    source = textwrap.dedent(source if source is not None else inspect.getsource(cls))
    lines = source.splitlines()
    comments: dict[int, tuple[int, str, bool]] = {}  # line (0-based) -> (column, text, continuation)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            body = tok.string[1:]
            # a continuation is aligned under the comment it continues: "#" and then a run of spaces
            comments[tok.start[0] - 1] = (tok.start[1], body.strip(), body.startswith("  "))
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, str] = {}
    body_indent = None
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "@", "def ", "class ", '"""')):
            continue
        indent = len(line) - len(line.lstrip())
        body_indent = body_indent if body_indent is not None else indent
        name = stripped.split(":", 1)[0].strip()
        if indent != body_indent or name not in names or ":" not in stripped:
            continue
        parts = []
        if i in comments and comments[i][0] > indent:  # a comment at the end of the field's line
            parts.append(comments[i][1])
            j = i + 1
            while j in comments and lines[j].strip().startswith("#") and comments[j][2]:
                parts.append(comments[j][1])
                j += 1
        else:  # the comment lines right above it
            j = i - 1
            while j >= 0 and lines[j].strip().startswith("#") and not comments[j][2]:
                parts.insert(0, comments[j][1])
                j -= 1
        out[name] = " ".join(p for p in parts if p)
    return out


def _type(cls: type, name: str) -> str:
    hint = typing.get_type_hints(cls)[name]
    text = str(hint) if not isinstance(hint, type) else hint.__name__
    return text.replace("typing.", "").replace("NoneType", "None")


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if dataclasses.is_dataclass(value):
        return "(section)"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        value = list(value)
    return "null" if value is None else repr(value).replace("'", '"') if isinstance(value, str) else str(value)


def missing() -> list[str]:
    """Keys whose field has no description in config.py."""
    out = []
    for prefix, cls in SECTIONS:
        comments = field_comments(cls)
        for f in dataclasses.fields(cls):
            if not dataclasses.is_dataclass(_default_value(f)) and not comments.get(f.name):
                out.append(f"{prefix}.{f.name}")
    return out


def _default_value(f):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def markdown() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Every key of a run's config: its type, default and meaning. Set them in a YAML file",
        "(`--config`) or as `key=value` overrides (`train.lr=1e-3`). Generated from",
        "`clippy_ray/config.py` by `python -m clippy_ray.config_reference > docs/config.md`;",
        "`tests/test_config_reference.py` fails when this page is stale or a field has no description.",
        "",
    ]
    for prefix, cls in SECTIONS:
        comments = field_comments(cls)
        lines += [f"## `{prefix}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(_default_value(f)):
                continue
            meaning = comments.get(f.name, "").replace("|", "\\|")
            kind = _type(cls, f.name).replace("|", "\\|")
            lines.append(f"| `{prefix}.{f.name}` | `{kind}` | `{_default(f)}` | {meaning} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(), end="")
