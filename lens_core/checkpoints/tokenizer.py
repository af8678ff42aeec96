"""Tokenizer loader: tokenizer.json, a tokenizer folder, the tokenizer embedded in the NVFP4 encoder file, or the
tokenizer.json placed beside a GGUF encoder."""
from __future__ import annotations

import os

from .. import checks as chk
from .detect import detect
from .errors import CheckpointError
from .gguf import is_gguf
from .safetensors import SafetensorsFile


def gguf_tokenizer_path(path: str) -> str:
    """The tokenizer.json used with a GPT-OSS GGUF: ``<file stem>.tokenizer.json`` beside it, else
    ``tokenizer.json`` or ``tokenizer/tokenizer.json`` in its folder (the GGUF's own vocabulary is not read)."""
    folder = os.path.dirname(os.path.abspath(path))
    stem = os.path.splitext(os.path.basename(path))[0]
    cands = [os.path.join(folder, stem + ".tokenizer.json"), os.path.join(folder, "tokenizer.json"),
             os.path.join(folder, "tokenizer", "tokenizer.json")]
    for c in cands:
        if os.path.isfile(c):
            return c
    raise CheckpointError(f"{path}: a GGUF text encoder needs the o200k_harmony tokenizer.json beside it; expected "
                          f"one of {cands}, found none. Fix: copy the tokenizer.json of gpt-oss / Lens (the "
                          f"diffusers folder's tokenizer/tokenizer.json) there")


def load_tokenizer(path):
    """The o200k_harmony tokenizer from a diffusers folder (``tokenizer/``), a tokenizer folder, a
    ``tokenizer.json`` file, the NVFP4 text-encoder file's embedded ``tokenizer_json`` tensor, or for a GGUF
    encoder the tokenizer.json beside it (:func:`gguf_tokenizer_path`)."""
    from .. import prompt

    p = os.fspath(path)
    if not os.path.exists(p):
        raise chk.missing_path(p)
    if os.path.isdir(p):
        for cand in (os.path.join(p, "tokenizer.json"), os.path.join(p, "tokenizer", "tokenizer.json")):
            if os.path.isfile(cand):
                return prompt.load_tokenizer(os.path.dirname(cand))
        sub = os.path.join(p, "tokenizer")
        listing = sorted(os.listdir(sub)) if os.path.isdir(sub) else sorted(os.listdir(p))
        raise CheckpointError(f"{p}: a folder without tokenizer: expected tokenizer/tokenizer.json (or "
                              f"tokenizer.json), found {listing}; copy the o200k_harmony tokenizer.json of Lens / "
                              f"gpt-oss into it, or pass the NVFP4 text-encoder file that embeds it")
    if p.endswith(".json"):
        return prompt.load_tokenizer(p)
    if is_gguf(p):
        return prompt.load_tokenizer(gguf_tokenizer_path(p))
    f = SafetensorsFile(p)
    try:
        if "tokenizer_json" not in f.entries:
            det = detect(f.entries)
            raise CheckpointError(f"{p}: expected a tokenizer (tokenizer.json, a folder, or a text-encoder file "
                                  f"with an embedded 'tokenizer_json' tensor), found {det.description} without "
                                  f"an embedded tokenizer")
        raw = f.read("tokenizer_json")
    finally:
        f.close()
    return prompt.load_tokenizer(raw)
