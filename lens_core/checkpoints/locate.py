"""Discovery: where a component's weights (or its tokenizer) are, for every path a user can give.

One routine, :func:`locate`, used by the loaders (:func:`~lens_core.checkpoints.source.open_source`,
:func:`~lens_core.checkpoints.tokenizer.load_tokenizer`), by the API/CLI path checks
(:func:`lens_core.pipeline.resolve_paths`), by the ``quantize`` converter and by the nodes' folder listing
(:func:`folder_kind`, :func:`is_weight_file_name`). It knows:

- **weight files**: a single file, chosen by content when it is opened (:func:`open_weight_file`: the GGUF magic,
  else safetensors, whose reader names any other format it finds); pickles are refused by name, before reading;
- **shard indexes** (``*.safetensors.index.json``), given directly or found in a folder;
- **diffusers folders**: a pipeline root (``model_index.json``) or a folder holding the component's subfolder,
  and component folders (``transformer/`` …: an index + shards, or one weight file, and its ``config.json``);
- **tokenizers**: a ``tokenizer.json``; a folder holding one (or ``tokenizer/tokenizer.json``); a diffusers
  root's ``tokenizer/``; the ``tokenizer/`` beside a ``text_encoder/`` folder; the side-car
  ``<stem>.tokenizer.json`` beside any text-encoder file; for a GGUF encoder also ``tokenizer.json`` (or
  ``tokenizer/tokenizer.json``) in its folder; for a safetensors encoder file the ``tokenizer_json`` tensor it
  embeds (the Comfy-Org NVFP4 file).

Nothing here reads a tensor: the only bytes read are the first 4 of a text-encoder file whose tokenizer is looked
for without a side-car (GGUF or not), so the API/CLI can check every path before any weight is loaded.
"""
from __future__ import annotations

import dataclasses
import os

from .. import checks as chk
from .errors import CheckpointError
from .safetensors import PICKLE_SUFFIXES, SafetensorsFile
from .weightfile import WeightFile

COMPONENT_DIRS = {"transformer": "transformer", "text_encoder": "text_encoder", "vae": "vae",
                  "tokenizer": "tokenizer"}
WEIGHT_COMPONENTS = ("transformer", "text_encoder", "vae")
DIFFUSERS_MARKER = "model_index.json"
INDEX_SUFFIX = ".safetensors.index.json"
#: file names a weight file may have in a model folder listing (the content decides what it is when opened)
WEIGHT_SUFFIXES = (".safetensors", ".sft", ".gguf")
GGUF_MAGIC = b"GGUF"
TOKENIZER_JSON = "tokenizer.json"
SIDECAR_SUFFIX = ".tokenizer.json"


@dataclasses.dataclass(frozen=True)
class Location:
    """Where ``component`` is. ``kind``: weights ``"file"`` (one weight file) or ``"index"`` (a shard index);
    tokenizer ``"json"`` (a tokenizer.json, ``"sidecar"`` when it is ``<stem>.tokenizer.json`` beside an encoder
    file) or ``"embedded"`` (the ``tokenizer_json`` tensor of a safetensors encoder file). ``path`` is what the
    loader opens; ``config_path`` the config.json that goes with the weights (None: derived from the shapes)."""
    component: str | None
    kind: str
    path: str
    config_path: str | None = None


def is_gguf(path) -> bool:
    """Whether ``path`` begins with the GGUF magic (content detection, never the file name)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def open_weight_file(path) -> WeightFile:
    """One weight file, by content: :class:`~lens_core.checkpoints.gguf.GGUFFile` for the GGUF magic, else
    :class:`SafetensorsFile` (which refuses pickles, truncated files and other formats, naming them)."""
    from .gguf import GGUFFile

    return GGUFFile(path) if is_gguf(path) else SafetensorsFile(path)


def is_diffusers_root(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, DIFFUSERS_MARKER))


def is_weight_file_name(name: str) -> bool:
    return name.lower().endswith(WEIGHT_SUFFIXES)


def has_weights(folder: str) -> bool:
    """Whether ``folder`` itself holds weight files or a shard index (a component folder or a loose file)."""
    return any(is_weight_file_name(n) or n.endswith(INDEX_SUFFIX) for n in _listdir(folder))


def folder_kind(names) -> str | None:
    """What a folder with these entry names is for a model listing: ``"pipeline"`` (a diffusers root with
    model_index.json), ``"component"`` (one model in a folder: a shard index, or config.json beside weights), or
    None (an ordinary folder whose weight files are listed one by one)."""
    names = set(names)
    if DIFFUSERS_MARKER in names:
        return "pipeline"
    if any(n.endswith(INDEX_SUFFIX) for n in names):
        return "component"
    if "config.json" in names and any(is_weight_file_name(n) for n in names):
        return "component"
    return None


def _listdir(folder: str) -> list[str]:
    try:
        return sorted(os.listdir(folder))
    except OSError:
        return []


def _where(path: str, label: str | None) -> str:
    return f"{label} {path}" if label else path


def _exists(path: str, label: str | None):
    if not os.path.exists(path):
        link = chk.link_problem(path, label or "")          # a symlink loop / broken link says so
        if link is not None:
            raise link
        parent = os.path.dirname(os.path.abspath(path))
        hint = (f"; {parent} holds {_listdir(parent)[:12]}" if os.path.isdir(parent) else
                f"; its folder {parent} does not exist either")
        raise FileNotFoundError(f"{_where(path, label)}: no such file or folder{hint}; fix: check the path")


def _refuse_pickle_name(path: str, label: str | None):
    low = path.lower()
    if low.endswith(PICKLE_SUFFIXES):
        raise CheckpointError(f"{_where(path, label)}: a pickle file ({os.path.splitext(path)[1]}); pickles are "
                              f"refused (safetensors only: pickles can run code); fix: use the .safetensors "
                              f"release of this model")


def locate(path, component: str | None = None, label: str | None = None) -> Location:
    """Where ``component`` (``transformer``/``text_encoder``/``vae``/``tokenizer``, or None for "whatever model
    this is") is, from a user's ``path``; nothing is loaded. ``label`` names the argument in messages (the CLI
    passes its flag, e.g. ``--model``). Raises FileNotFoundError / :class:`CheckpointError` naming the path, what
    was expected and found, and the fix."""
    p = os.fspath(path)
    if component is not None and component not in COMPONENT_DIRS:
        raise ValueError(f"locate: unknown component {component!r}; expected one of {sorted(COMPONENT_DIRS)}")
    _exists(p, label)
    if component == "tokenizer":
        return _locate_tokenizer(p, label)
    if os.path.isdir(p):
        if component is not None and (is_diffusers_root(p) or (os.path.isdir(os.path.join(p, component))
                                                               and not has_weights(p))):
            sub = os.path.join(p, COMPONENT_DIRS[component])
            if not os.path.isdir(sub):
                raise CheckpointError(f"{_where(p, label)}: a diffusers Lens folder without its '{component}/' "
                                      f"subfolder (found {_listdir(p)[:12]}); fix: complete the download, or pass "
                                      f"the {component} path")
            return _locate_folder(sub, component, label)
        return _locate_folder(p, component, label)
    _refuse_pickle_name(p, label)
    folder = os.path.dirname(os.path.abspath(p))
    cfg = os.path.join(folder, "config.json")
    if p.endswith(".json"):
        return Location(component, "index", p, cfg if os.path.isfile(cfg) else None)
    # a weight file inside a diffusers component folder (diffusers/transformers file names) uses its config.json;
    # a single file dropped next to some unrelated config.json does not
    own_cfg = os.path.isfile(cfg) and os.path.basename(p).startswith(("diffusion_pytorch_model", "model"))
    return Location(component, "file", p, cfg if own_cfg else None)


def _locate_folder(folder: str, component: str | None, label: str | None) -> Location:
    """A folder holding one model: ``*.safetensors.index.json`` + shards, or one weight file."""
    names = _listdir(folder)
    cfg = os.path.join(folder, "config.json")
    cfg = cfg if os.path.isfile(cfg) else None
    indexes = [n for n in names if n.endswith(INDEX_SUFFIX)]
    if indexes:
        return Location(component, "index", os.path.join(folder, indexes[0]), cfg)
    files = [n for n in names if n.endswith(".safetensors")] or [n for n in names if n.lower().endswith(".gguf")]
    if len(files) == 1:
        return Location(component, "file", os.path.join(folder, files[0]), cfg)
    if len(files) > 1:
        raise CheckpointError(f"{_where(folder, label)}: found several weight files {files[:12]} but no "
                              f"*{INDEX_SUFFIX} shard index; fix: pass one file explicitly")
    pickles = [n for n in names if n.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise CheckpointError(f"{_where(folder, label)}: expected .safetensors weights, found only pickle file(s) "
                              f"{pickles[:12]}; pickles are refused (safetensors only)")
    raise CheckpointError(f"{_where(folder, label)}: expected a diffusers Lens folder (model_index.json) or a "
                          f"folder with .safetensors weights (or a shard index), found {names[:12]}")


def tokenizer_in_folder(folder: str) -> str | None:
    """``tokenizer.json`` or ``tokenizer/tokenizer.json`` in ``folder`` (None when neither exists)."""
    for cand in (os.path.join(folder, TOKENIZER_JSON), os.path.join(folder, "tokenizer", TOKENIZER_JSON)):
        if os.path.isfile(cand):
            return cand
    return None


def sidecar_tokenizer(path: str) -> str:
    """The side-car tokenizer name of an encoder file: ``<file stem>.tokenizer.json`` beside it."""
    folder = os.path.dirname(os.path.abspath(path))
    return os.path.join(folder, os.path.splitext(os.path.basename(path))[0] + SIDECAR_SUFFIX)


def _locate_tokenizer(p: str, label: str | None) -> Location:
    """The tokenizer for a tokenizer path, or for the text encoder (file, index or folder) / diffusers root it
    comes with."""
    folder = p if os.path.isdir(p) else os.path.dirname(os.path.abspath(p))
    parent = os.path.dirname(os.path.abspath(folder))
    if os.path.isdir(p) or p.endswith(INDEX_SUFFIX):
        # a tokenizer folder, a diffusers root, or a text_encoder/ folder (or its index) with tokenizer/ beside it
        found = tokenizer_in_folder(folder) or (tokenizer_in_folder(parent) if has_weights(folder) else None)
        if found is not None:
            return Location("tokenizer", "json", found)
        sub = os.path.join(folder, "tokenizer")
        listing = _listdir(sub) if os.path.isdir(sub) else _listdir(folder)
        raise CheckpointError(f"{_where(p, label)}: a folder without tokenizer: expected tokenizer/tokenizer.json "
                              f"(or tokenizer.json), found {listing[:12]}; fix: copy the o200k_harmony "
                              f"tokenizer.json of Lens / gpt-oss into it, pass the tokenizer explicitly, or use "
                              f"the NVFP4 text-encoder file that embeds it")
    if p.lower().endswith(".json"):
        return Location("tokenizer", "json", p)
    _refuse_pickle_name(p, label)
    side = sidecar_tokenizer(p)
    if os.path.isfile(side):
        return Location("tokenizer", "sidecar", side)
    if is_gguf(p):
        found = tokenizer_in_folder(folder)
        if found is not None:
            return Location("tokenizer", "json", found)
        cands = [side, os.path.join(folder, TOKENIZER_JSON), os.path.join(folder, "tokenizer", TOKENIZER_JSON)]
        raise CheckpointError(f"{_where(p, label)}: a GGUF text encoder needs the o200k_harmony tokenizer.json "
                              f"beside it (the GGUF's own vocabulary is not read); expected one of {cands}, found "
                              f"none. Fix: copy the tokenizer.json of gpt-oss / Lens (the diffusers folder's "
                              f"tokenizer/tokenizer.json) there, e.g. as {os.path.basename(side)}")
    if os.path.isfile(os.path.join(folder, "config.json")) and os.path.basename(p).startswith("model"):
        # a weight file of a diffusers text_encoder/ folder: the tokenizer/ folder beside that folder
        found = tokenizer_in_folder(parent)
        if found is not None:
            return Location("tokenizer", "json", found)
    return Location("tokenizer", "embedded", p)
