"""Reading the small JSON files that sit beside checkpoints (config.json, index files, tokenizer_config.json)."""
from __future__ import annotations

import json
import os


#: far above any config / index / tokenizer_config a model ships (tokenizer.json itself is read by ``tokenizers``)
MAX_JSON_BYTES = 64 << 20


def read_json_object(path, what: str = "JSON file", error: type[Exception] = ValueError) -> dict:
    """The JSON object stored at ``path``; ``error`` (a ValueError subclass) names the file and what was wrong."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
            if len(raw) > MAX_JSON_BYTES:
                raise error(f"{path}: expected a {what} of at most {MAX_JSON_BYTES >> 20} MB, found a larger file")
            data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise error(f"{path}: expected a {what}, found invalid JSON ({str(exc)[:200]}). Fix: restore the file "
                    f"from the model's repository") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a {what} (a JSON object), found {type(data).__name__}")
    return data
