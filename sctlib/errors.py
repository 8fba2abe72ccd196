"""The one base class of expected, user-facing failures, and the CLI convention that goes with it.

Every entry point (``python -m sctlib.train``, ``python -m sctlib.convert``, ``python -m sctlib.data``, the
pipelines) catches :class:`UserError` - and operating-system errors such as a full disk or a read-only
folder - and prints ONE line on stderr (``error: ...``) naming the file or key and the problem, with exit
code 2. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import errno
import os
import sys
from typing import Callable, Optional

__all__ = ["UserError", "one_line", "is_expected", "cli_main"]


class UserError(Exception):
    """A failure caused by the input (file, key, value, folder) rather than by a bug; shown as one line."""


def _pil_bomb():
    try:
        from PIL import Image

        return Image.DecompressionBombError
    except Exception:  # noqa: BLE001 - PIL is optional for this check
        return None


def is_expected(exc: BaseException) -> bool:
    """True for the failures an entry point reports as one line (exit code 2)."""
    bomb = _pil_bomb()
    return isinstance(exc, (UserError, OSError, MemoryError)) or (bomb is not None and isinstance(exc, bomb))


def one_line(exc: BaseException) -> str:
    """``exc`` as one line: the message with the file named for OS errors (``[Errno 28] ...: 'path'``)."""
    if isinstance(exc, OSError) and not isinstance(exc, UserError) and exc.strerror:
        parts = [exc.strerror]
        if exc.filename is not None:
            parts.append(repr(os.fspath(exc.filename)) if isinstance(exc.filename, (str, bytes, os.PathLike))
                         else str(exc.filename))
        if exc.errno == errno.ENOSPC:
            parts.append("(free some space and re-run: finished files are kept, partial ones were removed)")
        msg = ": ".join(parts[:2]) + (" " + parts[2] if len(parts) > 2 else "")
    elif isinstance(exc, MemoryError):
        msg = f"out of memory{': ' + str(exc) if str(exc) else ''}"
    else:
        msg = str(exc) or type(exc).__name__
    return " ".join(msg.split())  # newlines inside a message would break the one-line promise


def cli_main(fn: Callable[[], Optional[int]]) -> int:
    """Run ``fn`` and map expected failures to ``error: <one line>`` on stderr and exit code 2."""
    try:
        rc = fn()
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BaseException as exc:  # noqa: BLE001 - re-raised below unless expected
        if isinstance(exc, SystemExit) or not is_expected(exc):
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    return 0 if rc is None else int(rc)
