"""Validation of untrusted values (config.json fields, header entries) before anything is built or allocated.

Every check raises ``ValueError`` with one message shape: ``"<where>: <name> expected <what>, found <value>"``,
so a caller that knows the file (a loader) can prefix it and add the fix. Booleans are never accepted as
integers, fractional or non-finite numbers never as sizes, and every size has an upper bound: a config that
asks for 10⁹ layers is refused here instead of being built layer by layer.
"""
from __future__ import annotations

import math


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _fail(where: str, name: str, expected: str, value):
    prefix = f"{where}: " if where else ""
    raise ValueError(f"{prefix}{name} expected {expected}, found {_show(value)}")


def integer(value, name: str, lo: int | None = None, hi: int | None = None, where: str = "") -> int:
    """``value`` as an int within [lo, hi]; floats (even 2.0), bools, strings and None are refused."""
    span = f" in [{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(where, name, "an integer" + span, value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        _fail(where, name, "an integer" + span, value)
    return int(value)


def number(value, name: str, lo: float | None = None, hi: float | None = None, where: str = "",
           lo_open: bool = False) -> float:
    """``value`` as a finite float within [lo, hi] (``(lo, hi]`` with ``lo_open``); NaN/inf are refused."""
    left = "(" if lo_open else "["
    span = f" in {left}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(where, name, "a finite number" + span, value)
    if lo is not None and (value <= lo if lo_open else value < lo):
        _fail(where, name, "a finite number" + span, value)
    if hi is not None and value > hi:
        _fail(where, name, "a finite number" + span, value)
    return float(value)


def boolean(value, name: str, where: str = "") -> bool:
    if not isinstance(value, bool):
        _fail(where, name, "true or false", value)
    return value


def text(value, name: str, choices=None, where: str = "", max_len: int = 256) -> str:
    if not isinstance(value, str) or len(value) > max_len or (choices is not None and value not in choices):
        _fail(where, name, f"one of {list(choices)}" if choices is not None else "a string", value)
    return value


def int_list(value, name: str, lo: int | None = None, hi: int | None = None, where: str = "",
             min_len: int = 1, max_len: int = 64) -> tuple:
    """A list/tuple of ints within [lo, hi], of length in [min_len, max_len]."""
    if not isinstance(value, (list, tuple)) or not min_len <= len(value) <= max_len:
        _fail(where, name, f"a list of {min_len}..{max_len} integers", value)
    return tuple(integer(v, f"{name}[{i}]", lo, hi, where) for i, v in enumerate(value))


def finite_tensor(t, name: str, fix: str = ""):
    """ValueError when tensor ``t`` holds NaN or ±inf (they would silently give a black or noise image)."""
    import torch

    if torch.is_tensor(t) and t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        nan = int(torch.isnan(t).sum())
        raise ValueError(f"{name}: expected finite numbers, found {bad} non-finite value(s) ({nan} NaN, "
                         f"{bad - nan} inf) in a tensor of shape {list(t.shape)}" + (f". Fix: {fix}" if fix else ""))
    return t


def link_problem(path, what: str = "", fix: str = "check the path") -> OSError | None:
    """For a path that does not resolve to anything: the error saying why when the reason is a symbolic link —
    a loop (``OSError``, errno ELOOP) or a broken link naming its target (``FileNotFoundError``) — else None
    (the caller reports "no such file" its own way). ``what`` prefixes the path (e.g. ``"--model"``)."""
    import errno
    import os

    p = os.fspath(path)
    label = f"{what} {p}" if what else p
    try:
        os.stat(p)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            where = (f"it points to {os.readlink(p)}, which leads back to itself" if os.path.islink(p) else
                     "a folder on its way is a link that leads back to itself")
            return _with_errno(OSError, errno.ELOOP, f"{label}: a symbolic-link loop ({where}: no file is ever "
                                                     f"reached); fix: point the link at the real file or folder")
        if os.path.islink(p):
            return _with_errno(FileNotFoundError, errno.ENOENT, f"{label}: a broken symbolic link to "
                                                                f"{os.readlink(p)} (no such file); fix: {fix}")
    return None


def missing_path(path, what: str = "", fix: str = "check the path", thing: str = "file or folder") -> OSError:
    """The error for a path that does not exist: :func:`link_problem`'s when a link is the reason, else
    ``FileNotFoundError`` "<what> <path>: no such <thing>; fix: <fix>". Returned, for the caller to raise."""
    import errno
    import os

    p = os.fspath(path)
    return link_problem(p, what, fix) or _with_errno(
        FileNotFoundError, errno.ENOENT, f"{f'{what} {p}' if what else p}: no such {thing}; fix: {fix}")


def _with_errno(cls, code: int, message: str) -> OSError:
    exc = cls(message)          # str(exc) is the message alone (no "[Errno N]" prefix)
    exc.errno = code
    return exc
