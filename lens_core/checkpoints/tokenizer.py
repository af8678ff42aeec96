"""Tokenizer loader: tokenizer.json, a tokenizer folder, or the tokenizer embedded in the NVFP4 encoder file."""
from __future__ import annotations

import os

from .detect import detect
from .errors import CheckpointError
from .safetensors import SafetensorsFile


def load_tokenizer(path):
    """The o200k_harmony tokenizer from a diffusers folder (``tokenizer/``), a tokenizer folder, a
    ``tokenizer.json`` file, or the NVFP4 text-encoder file's embedded ``tokenizer_json`` tensor."""
    from .. import prompt

    p = os.fspath(path)
    if not os.path.exists(p):
        raise FileNotFoundError(f"{p}: no such file or folder")
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
