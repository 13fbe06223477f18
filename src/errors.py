"""How every command of the template fails: one ``error:`` line on stderr and a non-zero exit.

Used by ``python -m src.train``, ``src.report`` and ``src.study``. No torch or Lightning import.
Set ``TEMPLATE_DEBUG=1`` to get the traceback instead.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from src.names import DEBUG_ENV


def debugging() -> bool:
    return bool(os.environ.get(DEBUG_ENV))


def one_line(message: object) -> str:
    """The message on one line; jsonargparse's 'none of the Union subtypes' lists cut to what matters.

    >>> one_line("no such\\n   file")
    'no such file'
    """
    text = " ".join(str(message).split())
    match = re.search(r"Does not validate against any of the Union subtypes Subtypes: \[.*?\] Errors: (.*)$", text)
    if match is None:
        return text
    errors = [e.strip() for e in re.split(r"(?:^| )- ", match.group(1)) if e.strip()]
    useful = [
        re.sub(r" ?Given value type: <class '[^']*'>", "", e)
        for e in errors
        if not e.startswith(("Expected a <class 'NoneType'>", "Expected a <class 'list'>", "Expected a <class 'bool'>"))
    ]
    return text[: match.start()] + " | ".join(useful or errors)


def fail(message: object, status: int = 1) -> None:
    """Write ``error: MESSAGE`` on one line and exit with ``status``."""
    sys.stderr.write(f"error: {one_line(message)}\n")
    sys.exit(status)


@contextmanager
def one_line_errors(
    expected: type[BaseException] | tuple[type[BaseException], ...] = Exception,
    hint: str = "",
    show_type: bool = False,
    quiet: bool = False,
    status: int = 1,
) -> Iterator[None]:
    """Turn an ``expected`` exception into one ``error:`` line and exit ``status`` (the traceback under TEMPLATE_DEBUG).

    ``show_type`` starts the line with the exception's class, ``hint`` ends it, and ``quiet`` exits
    without the line (another process reports the same error).
    """
    try:
        yield
    except expected as err:
        if debugging():
            raise
        if not quiet:
            name = f"{type(err).__name__}: " if show_type else ""
            sys.stderr.write(f"error: {name}{one_line(err)}{hint}\n")
        sys.exit(status)
