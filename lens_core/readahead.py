"""Background read-ahead of checkpoint bytes, so that disk I/O overlaps the copy/cast.

The checkpoint loader reads with positioned reads (issue 12: no memory map, so a file shrinking during a load
is an error instead of SIGBUS); its spans carry no mapping address and the helper gives ``posix_fadvise``
hints on the file. Spans of a memory map (``base`` != 0) are populated instead (the history below).

Why (BENCHMARKS.md "Loading", runs 1-5): a loader that copies tensors out of a memory map in file order pays the
disk read *and* the CPU work (page faults on the map, zeroing the fresh destination memory, the dtype cast) one
after the other when it is single-threaded: 1.4-2.1x the time of one plain read of the file. With one helper
thread that keeps the next few hundred MB of the map populated (``MADV_POPULATE_READ``: the kernel reads the
pages and maps them), the reading thread only copies, and the two overlap: about 1.0x one read.

The helper never touches Python objects while working: each step is one ``madvise`` (or ``posix_fadvise``) call
made through ctypes, which releases the GIL. It stays at most ``window`` bytes ahead of what the reader has
consumed, so the extra resident memory is bounded by the window (the loader drops consumed pages itself).

Platforms: Linux >= 5.14 populates (``MADV_POPULATE_READ``); older Linux kernels fall back to
``posix_fadvise(WILLNEED)`` on the file (asynchronous read-ahead into the page cache). Elsewhere no helper runs
and the loader's per-tensor ``MADV_WILLNEED`` hint is all there is.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import sys
import threading

MADV_POPULATE_READ = 22  # linux/mman.h, Linux 5.14+
_PAGE = mmap.PAGESIZE

_libc = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc.madvise.restype = ctypes.c_int
    except (OSError, AttributeError):  # pragma: no cover - exotic libc
        _libc = None

_populate_supported = _libc is not None  # cleared on the first EINVAL (kernel older than 5.14)


def available() -> bool:
    """Whether a helper thread can do anything on this platform."""
    return _libc is not None or hasattr(os, "posix_fadvise")


def mode(mapped: bool = False) -> str:
    """What the helper does here: "populate" (spans of a memory map, Linux >= 5.14), "fadvise" (file spans, as
    the checkpoint loader's positioned reads give, or older Linux kernels) or "none"."""
    if mapped and _libc is not None and _populate_supported:
        return "populate"
    return "fadvise" if hasattr(os, "posix_fadvise") else "none"


def _populate(address: int, length: int) -> bool:
    """Read and map ``length`` bytes of a file mapping at page-aligned ``address``; False if unsupported."""
    global _populate_supported
    if not _populate_supported:
        return False
    if _libc.madvise(address, length, MADV_POPULATE_READ) == 0:
        return True
    if ctypes.get_errno() == errno.EINVAL:  # this kernel has no MADV_POPULATE_READ
        _populate_supported = False
        return False
    return True  # EFAULT/EIO/ENOMEM: leave it to the reader's own page faults (which report real errors)


class Span:
    """``length`` bytes at file offset ``offset`` of the file ``fd`` mapped at ``base`` (a tensor's bytes)."""

    __slots__ = ("base", "fd", "offset", "length")

    def __init__(self, base: int, fd: int, offset: int, length: int):
        self.base, self.fd, self.offset, self.length = base, fd, offset, length


class ReadAhead:
    """A helper thread populating ``spans`` in order, at most ``window`` bytes ahead of :meth:`consumed`.

    Use as a context manager around the reading loop; call ``consumed(i)`` after span ``i`` has been read.
    Leaving the context stops and joins the thread (before the mapping may be closed).
    """

    def __init__(self, spans: list[Span], window: int = 256 << 20, chunk: int = 32 << 20):
        self.spans = spans
        self.window = window
        self.chunk = chunk
        self._ends = []
        total = 0
        for s in spans:
            total += s.length
            self._ends.append(total)
        self._done = 0  # bytes consumed by the reader
        self._stop = False
        self._cv = threading.Condition()
        self._thread = None

    def __enter__(self):
        if self.spans and available():
            self._thread = threading.Thread(target=self._run, name="lens-readahead", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        return False

    @property
    def active(self) -> bool:
        return self._thread is not None

    def consumed(self, index: int):
        with self._cv:
            self._done = self._ends[index]
            self._cv.notify_all()

    def _wait_until_allowed(self, position: int) -> int | None:
        """Block while ``position`` is more than a window ahead; the bytes consumed so far, None when stopped."""
        with self._cv:
            while not self._stop and position > self._done + self.window:
                self._cv.wait()
            return None if self._stop else self._done

    def _run(self):
        position = 0  # bytes of the span sequence handled so far
        for span in self.spans:
            step = 0
            while step < span.length:
                n = min(self.chunk, span.length - step)
                done = self._wait_until_allowed(position + step)
                if done is None:
                    return
                # bytes the reader has already consumed (and released) are not mapped in again
                if position + step + n > done:
                    self._fetch(span, step, n)
                step += n
            position += span.length

    @staticmethod
    def _fetch(span: Span, step: int, n: int):
        start = span.offset + step
        aligned = start - start % _PAGE
        length = start + n - aligned
        if span.base and _populate(span.base + aligned, length):
            return
        if hasattr(os, "posix_fadvise"):
            try:
                os.posix_fadvise(span.fd, aligned, length, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass
