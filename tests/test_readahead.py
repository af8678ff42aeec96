"""The background read-ahead helper used by the checkpoint loader (lens_core/readahead.py).

What is checked: it walks the spans in order, never more than ``window`` bytes ahead of what the reader has
consumed, stops and joins when the loop ends early; on Linux it really brings the file's pages into memory; and
the loader gives exactly the file's tensors with the helper populating, with the ``posix_fadvise`` fallback and
with no helper at all.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import sys
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

import fixtures as fx
from lens_core import checkpoints as ck
from lens_core import readahead


def _fetch_log(monkeypatch, ahead_ref):
    """Replace the helper's I/O step by a recorder of (absolute position, bytes consumed at that moment)."""
    log = []

    def fake_fetch(span, step, n):
        ahead = ahead_ref[0]
        idx = next(i for i, s in enumerate(ahead.spans) if s is span)
        before = ahead._ends[idx] - span.length
        log.append((before + step, n, ahead._done))

    monkeypatch.setattr(readahead.ReadAhead, "_fetch", staticmethod(fake_fetch))
    return log


def test_spans_fetched_in_order_within_the_window(monkeypatch):
    sizes = [5_000, 70_000, 0, 123_457, 9, 64_000, 300_000]
    spans = [readahead.Span(0, -1, 1000 * i, n) for i, n in enumerate(sizes)]
    window, chunk = 100_000, 16_384
    # a reader that never gets ahead, and a window larger than everything: every byte is fetched once, in order
    ref = [None]
    log = _fetch_log(monkeypatch, ref)
    ref[0] = readahead.ReadAhead(spans, window=1 << 30, chunk=chunk)
    with ref[0] as ahead:
        assert ahead.active
        ahead._thread.join(timeout=30)
        assert not ahead._thread.is_alive()
    assert not ahead.active
    assert [p for p, _, _ in log] == sorted(p for p, _, _ in log)
    assert sum(n for _, n, _ in log) == sum(sizes)
    assert max(n for _, n, _ in log) <= chunk
    # a reader that follows the helper span by span: never more than the window ahead of it, nothing
    # fetched that the reader had already consumed
    log.clear()
    ref[0] = readahead.ReadAhead(spans, window=window, chunk=chunk)
    with ref[0] as ahead:
        for i, end in enumerate(ahead._ends):
            start = end - sizes[i]
            for _ in range(3000):  # wait until the helper reached this span (or skipped past it)
                if sizes[i] == 0 or any(p >= start for p, _, _ in log):
                    break
                threading.Event().wait(0.001)
            ahead.consumed(i)
        ahead._thread.join(timeout=30)
    assert [p for p, _, _ in log] == sorted(p for p, _, _ in log)
    assert all(p <= done + window for p, _, done in log)
    assert all(p + n > done for p, n, done in log)
    assert 0 < sum(n for _, n, _ in log) <= sum(sizes)


def test_helper_skips_what_the_reader_already_consumed(monkeypatch):
    spans = [readahead.Span(0, -1, 0, 100_000) for _ in range(4)]
    ref = [None]
    log = _fetch_log(monkeypatch, ref)
    ref[0] = readahead.ReadAhead(spans, window=1 << 20, chunk=30_000)
    ref[0].consumed(1)  # the reader is already past the first two spans
    with ref[0] as ahead:
        ahead._thread.join(timeout=30)
    assert [p for p, _, _ in log][0] == 200_000
    assert sum(n for _, n, _ in log) == 200_000


def test_helper_waits_for_the_reader_and_stops_when_the_loop_fails(monkeypatch):
    spans = [readahead.Span(0, -1, 0, 1 << 20) for _ in range(8)]
    ref = [None]
    log = _fetch_log(monkeypatch, ref)
    with pytest.raises(RuntimeError):
        ref[0] = readahead.ReadAhead(spans, window=1 << 20, chunk=1 << 18)
        with ref[0] as ahead:
            ahead.consumed(0)
            for _ in range(200):  # let it run up to the window
                if log and log[-1][0] >= (2 << 20) - (1 << 18):
                    break
                threading.Event().wait(0.01)
            raise RuntimeError("reader failed")
    assert not ahead.active
    assert not any(t.name == "lens-readahead" for t in threading.enumerate())
    # consumed 1 MB with a 1 MB window: nothing fetched at or past 2 MB + one chunk
    assert log and max(p for p, _, _ in log) <= (2 << 20)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page residency via mincore is Linux-only")
def test_helper_brings_the_file_pages_in(tmp_path):
    """The loader's spans are file spans (positioned reads, no mapping): the helper's read-ahead hints put the
    tensor bytes in the page cache (checked through a mapping made here only to ask mincore)."""
    path = tmp_path / "blob.safetensors"
    save_file({"a": torch.arange(3 << 20, dtype=torch.int32), "b": torch.ones(1 << 20)}, str(path))
    f = ck.SafetensorsFile(path)
    with open(path, "rb") as fh:  # drop it from the page cache (best effort)
        os.fsync(fh.fileno())
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    spans = [f.span("a"), f.span("b")]
    assert all(s.base == 0 for s in spans)
    with readahead.ReadAhead(spans, window=1 << 30, chunk=1 << 20) as ahead:
        ahead._thread.join(timeout=30)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    with open(path, "rb") as fh:
        m = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        arr = torch.frombuffer(m, dtype=torch.uint8)
        pages = -(-f.size // mmap.PAGESIZE)
        vec = ctypes.create_string_buffer(pages)
        first = f.entries["a"].start // mmap.PAGESIZE
        for _ in range(100):   # WILLNEED read-ahead is asynchronous: give the reads time to land
            assert libc.mincore(arr.data_ptr(), f.size, vec) == 0
            resident = [b & 1 for b in vec.raw[first:pages]]
            if all(resident):
                break
            threading.Event().wait(0.1)
        del arr
        m.close()
    assert all(resident), f"{resident.count(0)} of {len(resident)} data pages not resident"
    f.close()


@pytest.mark.parametrize("mode", ["populate", "fadvise", "none"])
def test_loader_equal_in_every_readahead_mode(golden_dir, tmp_path, monkeypatch, mode):
    path = fx.write_comfy_dit_bf16(tmp_path / "lens_bf16.safetensors", golden_dir)
    calls = {"populate": 0, "fadvise": 0}
    real_populate = readahead._populate

    def counting_populate(address, length):
        calls["populate"] += 1
        return real_populate(address, length)

    def counting_fadvise(fd, offset, length, advice):
        calls["fadvise"] += 1
        assert advice == os.POSIX_FADV_WILLNEED

    monkeypatch.setattr(readahead, "_populate", counting_populate)
    if hasattr(os, "posix_fadvise"):
        monkeypatch.setattr(readahead.os, "posix_fadvise", counting_fadvise)
    if mode == "fadvise":
        monkeypatch.setattr(readahead, "_populate_supported", False)
    if mode == "none":
        monkeypatch.setattr(readahead, "available", lambda: False)
    expected = load_file(str(path))
    for dtype in (torch.bfloat16, torch.float32):  # same-dtype copy and cast-on-read
        m = ck.load_transformer(path, dtype=dtype)
        sd = m.state_dict()
        for k, v in expected.items():
            assert torch.equal(sd[k], v.to(dtype)), k
    if mode == "none":     # no helper thread: only the loader's own per-tensor hint (posix_fadvise where it exists)
        assert calls["populate"] == 0
    elif sys.platform.startswith("linux"):
        assert calls["fadvise"] > 0 and calls["populate"] == 0   # file spans: page-cache hints, no mapping
