"""Reading the small JSON files that sit beside checkpoints (config.json, index files, tokenizer_config.json)."""
from __future__ import annotations

import json
import os


def read_json_object(path, what: str = "JSON file", error: type[Exception] = ValueError) -> dict:
    """The JSON object stored at ``path``; ``error`` (a ValueError subclass) names the file and what was wrong."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path}: expected a {what}, found invalid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a {what} (a JSON object), found {type(data).__name__}")
    return data
