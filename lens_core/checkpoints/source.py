"""Tensor sources: a file, a shard index or a component folder (or already-read tensors), with key renaming."""
from __future__ import annotations

import contextlib
import os
from typing import Callable

from ..lazy_torch import torch

from .. import checks as chk
from .. import readahead
from ..jsonfile import read_json_object
from .errors import CheckpointError
from .safetensors import PICKLE_SUFFIXES, ST_NAMES, SafetensorsFile, TensorEntry


class TensorSource:
    """The tensors of one component, possibly over several shards, under canonical (renamed) keys."""

    def __init__(self, files: list[SafetensorsFile], keymap: dict[str, tuple[SafetensorsFile, str]],
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
        return f.entries[k].dtype if getattr(f, "is_quantized", None) and f.is_quantized(k) else None

    def read_bytes(self, key, device=None) -> torch.Tensor:
        """The stored GGML bytes of a quantized GGUF tensor (``[*shape[:-1], row bytes]`` uint8)."""
        f, k = self.keymap[key]
        return f.read_bytes(k, device)

    @property
    def architecture(self) -> str | None:
        """``general.architecture`` of a GGUF source (None otherwise, and for sd.cpp files, which omit it)."""
        return next((f.architecture for f in self.files if getattr(f, "architecture", None)), None)

    def close(self):
        for f in self.files:
            f.close()


COMPONENT_DIRS = {"transformer": "transformer", "text_encoder": "text_encoder", "vae": "vae",
                  "tokenizer": "tokenizer"}


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


def _refuse_pickles_in(folder: str):
    names = os.listdir(folder)
    pick = [n for n in names if n.lower().endswith(PICKLE_SUFFIXES)]
    if pick:
        raise CheckpointError(f"{folder}: expected .safetensors weights, found only pickle file(s) {sorted(pick)}; "
                              f"pickles are refused (safetensors only)")


def open_component_folder(folder: str) -> TensorSource:
    """A folder holding one model: ``*.safetensors.index.json`` + shards, or one ``*.safetensors`` file."""
    names = sorted(os.listdir(folder))
    cfg_path = os.path.join(folder, "config.json")
    config = _read_json(cfg_path) if os.path.isfile(cfg_path) else None
    indexes = [n for n in names if n.endswith(".safetensors.index.json")]
    if indexes:
        files, keymap = _open_index(os.path.join(folder, indexes[0]))
        origin = os.path.join(folder, indexes[0])
    else:
        st = [n for n in names if n.endswith(".safetensors")]
        if not st:
            _refuse_pickles_in(folder)
            raise CheckpointError(f"{folder}: expected .safetensors weights (or a shard index), found {names}")
        if len(st) > 1:
            raise CheckpointError(f"{folder}: found several .safetensors files {st} but no "
                                  f"*.safetensors.index.json shard index; pass one file explicitly")
        f = SafetensorsFile(os.path.join(folder, st[0]))
        files, keymap, origin = [f], {k: (f, k) for k in f.entries}, f.path
    return TensorSource(files, keymap, origin, config, cfg_path if config is not None else None)


def is_diffusers_root(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "model_index.json"))


def open_source(path, component: str | None = None) -> TensorSource:
    """The raw tensors behind ``path`` for ``component`` (``transformer``/``text_encoder``/``vae``)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise chk.missing_path(path)
    if os.path.isdir(path):
        if component and is_diffusers_root(path) or (component and os.path.isdir(os.path.join(path, component))
                                                     and not _has_weights(path)):
            sub = os.path.join(path, COMPONENT_DIRS[component])
            if not os.path.isdir(sub):
                raise CheckpointError(f"{path}: a diffusers Lens folder without a '{component}/' subfolder "
                                      f"(found {sorted(os.listdir(path))})")
            return open_component_folder(sub)
        return open_component_folder(path)
    if path.endswith(".json"):
        files, keymap = _open_index(path)
        folder = os.path.dirname(path)
        cfg_path = os.path.join(folder, "config.json")
        config = _read_json(cfg_path) if os.path.isfile(cfg_path) else None
        return TensorSource(files, keymap, path, config, cfg_path if config is not None else None)
    f = open_file(path)
    folder = os.path.dirname(os.path.abspath(path))
    cfg_path = os.path.join(folder, "config.json")
    config = None
    # a weight file inside a diffusers component folder (diffusers/transformers file names) uses its config.json;
    # a single file dropped next to some unrelated config.json does not
    if os.path.isfile(cfg_path) and os.path.basename(path).startswith(("diffusion_pytorch_model", "model")):
        with contextlib.suppress(CheckpointError):
            config = _read_json(cfg_path)
    return TensorSource([f], {k: (f, k) for k in f.entries}, path, config,
                        cfg_path if config is not None else None)


def open_file(path) -> SafetensorsFile:
    """One weight file, by content: a GGUF file (magic ``GGUF``) or safetensors."""
    from .gguf import GGUFFile, is_gguf

    return GGUFFile(path) if is_gguf(path) else SafetensorsFile(path)


def _has_weights(folder: str) -> bool:
    return any(n.endswith((".safetensors", ".safetensors.index.json")) for n in os.listdir(folder))


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
