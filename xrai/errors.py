"""Which failures are the user's to fix, and how they read: one line, no Python objects, exit code 2.

A new error a user can fix (a bad file, a missing download, a setting out of range) subclasses
``UserError`` (with the built-in class it also is, e.g. ``class XError(UserError, ValueError)``), and
every command of the CLI and ``serve`` turns it into one line, with no new code there. Bugs stay
tracebacks with exit code 1. This module imports nothing of xrai, so every module may use it.
"""

from __future__ import annotations

import errno
import os
import re
import sys

__all__ = ["USER_ERRORS", "DiskFullError", "UserError", "disk_full_cause", "first_lines", "is_user_error", "one_line",
           "outside_package_stacklevel"]


class UserError(Exception):
    """A failure the user can fix; the message names the file or setting and what to do."""


class DiskFullError(UserError, OSError):
    """No space (or quota) left where a file was being written; the message names the folder, the free
    space and about how much is needed."""


# Built-in errors that reach a user from their own input: ValueError is how every xrai check (and
# argparse-free API misuse) reports a bad setting; the OSErrors name the path they failed on.
USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError,
    ValueError,
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)

# Other OSErrors that are the machine's state, not a bug: a full disk or quota, a read-only mount.
_USER_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM}

_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and every exception behind it (``__cause__``, else ``__context__``), each once."""
    seen: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and all(current is not s for s in seen):
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def disk_full_cause(error: BaseException) -> OSError | None:
    """The OSError with errno ENOSPC or EDQUOT in ``error``'s chain, if any.

    A library's writer often wraps it: torch.save raises ``RuntimeError: ... unexpected pos ...`` with
    the ``OSError: [Errno 28]`` only as its ``__context__``.
    """
    return next((e for e in _chain(error) if isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS), None)


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` is a failure the user can fix (one line, exit 2) rather than a bug.

    A full disk or quota anywhere in the exception chain counts (see ``disk_full_cause``).
    """
    if isinstance(error, USER_ERRORS):
        return True
    if isinstance(error, OSError) and error.errno in _USER_ERRNOS:
        return True
    return disk_full_cause(error) is not None


def one_line(error: BaseException | str) -> str:
    """The error's message on one line, with any ``<... object at 0x...>`` repr replaced by "the data".

    Multi-line messages (a resume's list of differing settings) are joined with "; ". An error with a full
    disk behind it (a library's wrapper) reads as that OSError.
    """
    if isinstance(error, BaseException) and not isinstance(error, (UserError, OSError)):
        error = disk_full_cause(error) or error
    if isinstance(error, OSError) and not isinstance(error, UserError) and (
            error.filename is not None or error.errno in _DISK_FULL_ERRNOS):
        return first_lines(_os_error_text(error), None)
    return first_lines(error, None)


def first_lines(error: BaseException | str, n: int | None = 1) -> str:
    """The first ``n`` non-blank lines of an error's message (all with None), stripped and joined with
    "; ", any ``<... object at 0x...>`` repr replaced by "the data"; the error's type name when blank.

    For the reason a wrapping error quotes in parentheses (a library's message can run to many lines).
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = "; ".join(lines if n is None else lines[:n]) or type(error).__name__
    return _OBJECT_REPR.sub("the data", text)


def _os_error_text(error: OSError) -> str:
    """'permission denied: /x/y (check who owns it ...)' instead of "[Errno 13] Permission denied: '/x/y'"."""
    where = "" if error.filename is None else str(error.filename)
    where += f" -> {error.filename2}" if error.filename2 is not None else ""
    reason = (error.strerror or type(error).__name__).lower()
    hint = {
        errno.EACCES: "check the file's owner and permissions, or choose another path",
        errno.EPERM: "check the file's owner and permissions, or choose another path",
        errno.ENOSPC: "free some disk space or choose a folder on a larger disk",
        errno.EDQUOT: "free some space in your quota or choose another folder",
        errno.EROFS: "choose a folder on a writable disk",
    }.get(error.errno)
    return reason + (f": {where}" if where else "") + (f" ({hint})" if hint else "")


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep  # .../xrai/


def outside_package_stacklevel() -> int:
    """The stacklevel, for a warning issued by this function's caller, of the nearest frame outside xrai: a
    notebook cell or a script sees its own line, never a line of the package's source."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level
