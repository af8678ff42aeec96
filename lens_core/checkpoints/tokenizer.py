"""Tokenizer loader: whatever :func:`~lens_core.checkpoints.locate.locate` finds for ``"tokenizer"`` — a
tokenizer.json (given, in a folder, a diffusers root's ``tokenizer/``, the side-car ``<stem>.tokenizer.json`` or
the tokenizer.json beside a GGUF encoder) or the tokenizer embedded in the NVFP4 encoder file."""
from __future__ import annotations

from .detect import detect
from .errors import CheckpointError
from .locate import locate
from .safetensors import SafetensorsFile


def load_tokenizer(path):
    """The o200k_harmony tokenizer for ``path``: a diffusers folder (``tokenizer/``), a tokenizer folder, a
    ``tokenizer.json`` file, a text-encoder file (its side-car ``<stem>.tokenizer.json``; for a GGUF the
    tokenizer.json beside it; else the NVFP4 file's embedded ``tokenizer_json`` tensor)."""
    from .. import prompt

    loc = locate(path, "tokenizer")
    if loc.kind != "embedded":
        return prompt.load_tokenizer(loc.path)
    f = SafetensorsFile(loc.path)
    try:
        if "tokenizer_json" not in f.entries:
            det = detect(f.entries)
            raise CheckpointError(f"{loc.path}: expected a tokenizer (tokenizer.json, a folder, or a text-encoder "
                                  f"file with an embedded 'tokenizer_json' tensor), found {det.description} "
                                  f"without an embedded tokenizer; fix: pass the tokenizer.json, or put it beside "
                                  f"the file as {loc.path.rsplit('.', 1)[0]}.tokenizer.json")
        raw = f.read("tokenizer_json")
    finally:
        f.close()
    return prompt.load_tokenizer(raw)
