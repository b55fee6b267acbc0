"""docs/config.md is the configuration reference generated from clippy_ray/config.py: every key
described, the page current."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

from clippy_ray import config_reference

PAGE = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def test_every_config_key_has_a_description():
    assert config_reference.missing() == [], "describe these fields with a comment in clippy_ray/config.py"


def test_the_page_is_what_the_code_generates():
    assert PAGE.read_text() == config_reference.markdown(), (
        "docs/config.md is stale: python -m clippy_ray.config_reference > docs/config.md"
    )


def test_a_field_without_a_description_is_found_and_comments_of_each_form_are_read():
    namespace: dict = {}
    source = textwrap.dedent(
        """
        from dataclasses import dataclass

        @dataclass
        class Example:
            plain: int = 1
            trailing: int = 2  # the trailing comment
            #                    and its continuation
            # the comment above
            above: str = "x"
        """
    )
    exec(compile(source, "<example>", "exec"), namespace)
    cls = namespace["Example"]
    comments = config_reference.field_comments(cls, source[source.index("@dataclass") :])
    assert comments == {
        "plain": "",
        "trailing": "the trailing comment and its continuation",
        "above": "the comment above",
    }
    assert [f.name for f in dataclasses.fields(cls) if not comments[f.name]] == ["plain"]
