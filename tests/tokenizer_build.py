"""Offline rebuild of the real o200k_harmony ``tokenizer.json`` (test helper, not shipped at run time).

Recipe: ../shared/golden/pipeline_tiny/tokenizer/TOKENIZER_REBUILD.md and ../shared/docs/text_encoder_spec.md §4.
The BPE ranks come from the data file inside the ``bpe-openai`` wheel (no network). The result is a
``tokenizers`` byte-level BPE whose ids equal tiktoken's o200k_harmony ids.
"""
from __future__ import annotations

import base64
import gzip
import hashlib
import importlib.util
import os

O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"

# The seven alternatives of the o200k pre-tokenizer regex (tiktoken o200k_base), joined with "|".
O200K_PATTERN = "|".join([
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])

NAMED_SPECIALS = {
    199998: "<|startoftext|>", 199999: "<|endoftext|>", 200002: "<|return|>", 200003: "<|constrain|>",
    200005: "<|channel|>", 200006: "<|start|>", 200007: "<|end|>", 200008: "<|message|>",
    200012: "<|call|>", 200018: "<|endofprompt|>",
}
FIRST_SPECIAL, VOCAB_SIZE = 199998, 201088


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2 byte-level alphabet: printable bytes map to themselves, the rest to code points 256+."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def load_o200k_ranks() -> dict[bytes, int]:
    spec = importlib.util.find_spec("bpe_openai")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("bpe-openai is not installed: pip install -r requirements-dev.txt")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "o200k_base.tiktoken.gz")
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != O200K_SHA256:
        raise RuntimeError(f"{path}: sha256 {digest}, expected {O200K_SHA256}")
    ranks = {}
    for line in raw.splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def build_o200k_harmony(out_path: str) -> str:
    """Write the o200k_harmony tokenizer.json to ``out_path`` and return it."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    ranks = load_o200k_ranks()
    to_uni = _byte_to_unicode()

    def name(token: bytes) -> str:
        return "".join(to_uni[b] for b in token)

    vocab = {name(tok): rank for tok, rank in ranks.items()}
    merges = []
    for tok, rank in ranks.items():
        if len(tok) < 2:
            continue
        local = []
        for i in range(1, len(tok)):
            left, right = tok[:i], tok[i:]
            if left in ranks and right in ranks:
                local.append((ranks[left], ranks[right], left, right))
        local.sort()
        merges.extend((rank, name(l), name(r)) for _, _, l, r in local)
    merges.sort(key=lambda m: m[0])  # stable: keeps the (rank(left), rank(right)) order inside a token

    bpe = models.BPE(vocab=vocab, merges=[(l, r) for _, l, r in merges], fuse_unk=False, ignore_merges=True)
    tk = Tokenizer(bpe)
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(O200K_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    for idx in range(FIRST_SPECIAL, VOCAB_SIZE):
        content = NAMED_SPECIALS.get(idx, f"<|reserved_{idx}|>")
        tk.add_special_tokens([AddedToken(content, special=True, normalized=False)])
        got = tk.token_to_id(content)
        if got != idx:
            raise RuntimeError(f"special token {content} landed on id {got}, expected {idx}")
    tk.save(out_path)
    return out_path
