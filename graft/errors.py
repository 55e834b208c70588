"""The one error type users see: a message that names the file, row or key at fault."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., object])

ERROR_PREFIX = "graft: error: "
WARNING_PREFIX = "graft: warning: "

# Exit codes a user or a scheduler can act on: fix the input, report a bug, or try again later.
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1
EXIT_TRANSIENT = 75  # sysexits' EX_TEMPFAIL: worth retrying unchanged


class GraftError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""

    exit_code = EXIT_BAD_INPUT


class TransientError(GraftError):
    """A failure that may pass on its own (network, a busy workspace): retried, exit 75."""

    exit_code = EXIT_TRANSIENT


def exits_cleanly(main: F) -> F:
    """Turn a GraftError raised by a stage's main() into one line on stderr and its exit code
    (2 for bad input, 75 for a transient failure), so the flow knows whether to retry."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except GraftError as err:
            message = str(err).replace("\n", "\n  ")
            sys.stderr.write(f"{ERROR_PREFIX}{message}\n")
            raise SystemExit(err.exit_code) from None

    return wrapper  # type: ignore[return-value]
