"""The one error type users see: a message that names the file, row or key at fault."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., object])

ERROR_PREFIX = "graft: error: "


class GraftError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""


def exits_cleanly(main: F) -> F:
    """Turn a GraftError raised by a stage's main() into one line on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except GraftError as err:
            message = str(err).replace("\n", "\n  ")
            sys.stderr.write(f"{ERROR_PREFIX}{message}\n")
            raise SystemExit(2) from None

    return wrapper  # type: ignore[return-value]
