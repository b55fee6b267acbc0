"""The project's own errors: a person's mistake (a bad config field, a missing file, data that does
not fit). The CLI prints these as one line, `clippy-ray: <message>`, and exits 2; anything else is a
bug and shows its traceback."""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix; the message names the field or URI and the fix."""


class InputError(UserError, ValueError):
    """A bad value handed in (an option, a file's contents) that no more specific error covers."""
