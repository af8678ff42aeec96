"""Tensor sources: a file, a shard index or a component folder (or already-read tensors), with key renaming."""
from __future__ import annotations

import os
from typing import Callable

from ..lazy_torch import torch

from .. import checks as chk
from .. import readahead
from ..jsonfile import read_json_object
from .errors import CheckpointError
from .locate import COMPONENT_DIRS, Location, has_weights as _has_weights, is_diffusers_root, locate, open_weight_file
from .safetensors import ST_NAMES, SafetensorsFile
from .weightfile import TensorEntry, WeightFile


class TensorSource:
    """The tensors of one component, possibly over several shards, under canonical (renamed) keys."""

    def __init__(self, files: list[WeightFile], keymap: dict[str, tuple[WeightFile, str]],
                 origin: str, config: dict | None = None, config_path: str | None = None):
        self.files = files
        self.keymap = keymap
        self.origin = origin
        self.config = config
        self.config_path = config_path

    @property
    def metadata(self) -> dict:
        md = {}
        for f in self.files:
            md.update(f.metadata)
        return md

    def keys(self):
        return self.keymap.keys()

    def __contains__(self, key):
        return key in self.keymap

    def entry(self, key) -> TensorEntry:
        f, k = self.keymap[key]
        return f.entries[k]

    def file_of(self, key) -> str:
        return self.keymap[key][0].path

    def shape(self, key) -> tuple:
        return self.entry(key).shape

    def dtype(self, key) -> str:
        return self.entry(key).dtype

    def read(self, key, dtype=None, device=None) -> torch.Tensor:
        f, k = self.keymap[key]
        return f.read(k, dtype, device)

    def prefetch(self, key):
        if key in self.keymap:
            f, k = self.keymap[key]
            f.prefetch(k)

    def span(self, key) -> readahead.Span | None:
        if key not in self.keymap:
            return None
        f, k = self.keymap[key]
        return f.span(k)

    def location(self, key) -> tuple:
        """(file, byte offset) of ``key``: reading in this order makes the file access sequential."""
        if key not in self.keymap:
            return ("", 0)
        f, k = self.keymap[key]
        return (f.path, f.entries[k].start)

    def rename(self, fn: Callable[[str], str | None]) -> "TensorSource":
        km = {}
        for k, v in self.keymap.items():
            nk = fn(k)
            if nk is not None:
                km[nk] = v
        return TensorSource(self.files, km, self.origin, self.config, self.config_path)

    def nbytes(self) -> int:
        return sum(self.entry(k).nbytes for k in self.keymap)

    def quant_type(self, key) -> str | None:
        """The GGML block type of ``key`` when it is stored quantized in a GGUF file, else None."""
        f, k = self.keymap[key]
        return f.quant_type(k)

    def read_bytes(self, key, device=None) -> torch.Tensor:
        """The stored GGML bytes of a quantized GGUF tensor (``[*shape[:-1], row bytes]`` uint8)."""
        f, k = self.keymap[key]
        return f.read_bytes(k, device)

    @property
    def architecture(self) -> str | None:
        """``general.architecture`` of a GGUF source (None otherwise, and for sd.cpp files, which omit it)."""
        return next((f.architecture for f in self.files if f.format == "gguf" and f.architecture), None)

    def close(self):
        for f in self.files:
            f.close()


def _read_json(path: str) -> dict:
    return read_json_object(path, "JSON file", CheckpointError)


def _allowed_roots(folder: str) -> list[str]:
    """Where the shards of an index in ``folder`` may resolve to: the folder itself, and for a Hugging Face hub
    cache snapshot (``models--org--name/snapshots/<rev>/…``, whose files are symlinks) that repository's
    ``blobs/`` folder."""
    real = os.path.realpath(folder)
    roots = [real]
    parts = real.split(os.sep)
    if "snapshots" in parts:
        i = len(parts) - 1 - parts[::-1].index("snapshots")
        blobs = os.sep.join(parts[:i] + ["blobs"])
        if os.path.isdir(blobs):
            roots.append(blobs)
    return roots


def shard_path(index_path: str, name) -> str:
    """The file a shard index names, which must resolve (symlinks included) inside the index's folder: an
    absolute name, ``..`` or a link leading elsewhere is refused (an index must not make the loader read files
    outside the model folder)."""
    folder = os.path.dirname(os.path.abspath(index_path))
    if not isinstance(name, str) or not name.endswith(".safetensors") or "\0" in name:
        raise CheckpointError(f"{index_path}: expected shard file names ending in .safetensors in 'weight_map', "
                              f"found {name!r:.100}. Fix: repair the index or download it again")
    path = os.path.join(folder, name)
    real = os.path.realpath(path)
    if os.path.isabs(name) or ".." in name.replace("\\", "/").split("/") or not any(
            os.path.commonpath([real, root]) == root for root in _allowed_roots(folder)):
        raise CheckpointError(f"{index_path}: the index names the shard {name!r}, which resolves to {real}, outside "
                              f"the index's folder {folder}; shards must be files inside that folder (refused: "
                              f"an index must not make the loader read other files). Fix: use the repository's "
                              f"own index, or put the shards next to it")
    return path


def _open_index(index_path: str) -> tuple[list[SafetensorsFile], dict]:
    data = _read_json(index_path)
    wm = data.get("weight_map")
    if not isinstance(wm, dict) or not wm:
        raise CheckpointError(f"{index_path}: expected a shard index with a non-empty 'weight_map', found keys "
                              f"{sorted(data)[:10]}")
    folder = os.path.dirname(os.path.abspath(index_path))
    shards = sorted(set(shard_path(index_path, s) for s in wm.values()))
    missing = [os.path.basename(s) for s in shards if not os.path.isfile(s)]
    if missing:
        raise CheckpointError(f"{index_path}: the index lists shard(s) {missing[:8]} that are missing from {folder} "
                              f"(incomplete download?); present: "
                              f"{sorted(n for n in os.listdir(folder) if n.endswith('.safetensors'))[:8]}")
    files = {s: SafetensorsFile(s) for s in shards}
    keymap = {}
    for key, shard in wm.items():
        f = files[os.path.join(folder, shard)]
        if key not in f.entries:
            raise CheckpointError(f"{f.path}: the index {os.path.basename(index_path)} maps tensor {key!r:.100} to "
                                  f"this shard, but the shard does not contain it")
        keymap[key] = (f, key)
    return list(files.values()), keymap


def open_component_folder(folder: str) -> TensorSource:
    """A folder holding one model: ``*.safetensors.index.json`` + shards, or one weight file."""
    return open_location(locate(folder))


def open_source(path, component: str | None = None) -> TensorSource:
    """The raw tensors behind ``path`` for ``component`` (``transformer``/``text_encoder``/``vae``), found by
    :func:`~lens_core.checkpoints.locate.locate`."""
    return open_location(locate(path, component))


def open_location(loc: Location) -> TensorSource:
    """The tensors of a located file or shard index, with the config.json that goes with them."""
    if loc.kind == "index":
        files, keymap = _open_index(loc.path)
    else:
        f = open_weight_file(loc.path)
        files, keymap = [f], {k: (f, k) for k in f.entries}
    try:
        config = _read_json(loc.config_path) if loc.config_path is not None else None
    except BaseException:
        for f in files:
            f.close()
        raise
    return TensorSource(files, keymap, loc.path, config, loc.config_path)


open_file = open_weight_file


class DictSource(TensorSource):
    """Already-read tensors under canonical names (used after a whole-dict key mapping, e.g. BFL → diffusers)."""

    def __init__(self, tensors: dict, origin: str):
        super().__init__([], {}, origin)
        self.tensors = tensors

    def keys(self):
        return self.tensors.keys()

    def __contains__(self, key):
        return key in self.tensors

    def shape(self, key):
        return tuple(self.tensors[key].shape)

    def dtype(self, key):
        return ST_NAMES[self.tensors[key].dtype]

    def file_of(self, key):
        return self.origin

    def read(self, key, dtype=None, device=None):
        return self.tensors.pop(key).to(dtype=dtype, device=device)

    def prefetch(self, key):
        pass

    def location(self, key):
        return ("", 0)


def _dtype_summary(source: TensorSource) -> str:
    counts = {}
    for k in source.keys():
        e = source.entry(k)
        counts[e.dtype] = counts.get(e.dtype, 0) + e.nbytes
    return ", ".join(f"{d} {b / 1e6:.1f} MB" for d, b in sorted(counts.items(), key=lambda x: -x[1]))
