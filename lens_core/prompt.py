"""The Lens prompt path: harmony template, tokenizer loading, ids/masks, the 97-token crop, batch encoding.

Spec: ../shared/docs/text_encoder_spec.md §3 (template, crop, padding, negatives) and §4 (tokenizer).

- :func:`render_prompt` builds the exact string the official pipeline gets from the gpt-oss chat template
  (system preamble with a date, developer instruction, user prompt, fake analysis turn, open final turn), cut
  at the first ``<|return|>``. The prompt is inserted verbatim (no stripping, no escaping).
- The date in the preamble changes the features slightly (it is causal context). The official code uses
  "today"; we pin :data:`DEFAULT_TEMPLATE_DATE` (the date the reference outputs were produced with) and expose
  it as an option (``"today"`` gives the official, drifting behaviour).
- :func:`tokenize` pads on the right to the longest prompt, truncates on the right at ``max_length`` (512
  tokens including the preamble, as the official inference) and warns how many tokens were dropped.
- :func:`encode_prompts` runs the encoder and drops the first :data:`PREAMBLE_TOKENS` (97) positions of every
  selected layer and of the mask.
- The empty negative prompt is never encoded: :func:`empty_negative` gives zero features and an all-False
  mask of the positive's shape (the sampler applies it).
"""
from __future__ import annotations

import datetime
import os
import re
import warnings

from .lazy_torch import torch

from .jsonfile import read_json_object

DEFAULT_TEMPLATE_DATE = "2026-05-23"
PREAMBLE_TOKENS = 97
MAX_SEQUENCE_LENGTH = 512
DEFAULT_PAD_TOKEN = "<|endoftext|>"
DEFAULT_PAD_ID = 199999

# The fixed image-description instruction Lens passes as its (developer) system message.
LENS_INSTRUCTION = ("Describe the image by detailing the color, shape, size, texture, quantity, text, spatial "
                    "relationships of the objects and background.")
# The fixed "thinking" of the fake assistant analysis turn.
LENS_ANALYSIS = "Need to generate one image according to the description."

_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def resolve_date(date=None) -> str:
    """``None`` → the pinned default; ``"today"`` → today's local date (official behaviour); a
    ``datetime.date`` or a ``"YYYY-MM-DD"`` string as given."""
    if date is None:
        return DEFAULT_TEMPLATE_DATE
    if isinstance(date, (datetime.date, datetime.datetime)):
        return date.strftime("%Y-%m-%d")
    if isinstance(date, str):
        if date.strip().lower() == "today":
            return datetime.datetime.now().strftime("%Y-%m-%d")
        if _DATE_RE.match(date):
            try:
                datetime.date.fromisoformat(date)  # rejects impossible dates such as 2026-13-40
                return date
            except ValueError:
                pass
    raise ValueError(f"template date: expected None, 'today', a datetime.date or a 'YYYY-MM-DD' string, "
                     f"found {date!r}")


def harmony_preamble(date: str, instructions: str, reasoning: str = "medium") -> str:
    """What the gpt-oss chat template renders before a user message for a conversation [system message
    ``instructions``, user message]: the fixed system block (identity, cutoff, ``date``, ``Reasoning:
    <reasoning>``, channels), the system message as the developer block, and the opening of the user turn."""
    return ("<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
            "Knowledge cutoff: 2024-06\n"
            f"Current date: {date}\n\n"
            f"Reasoning: {reasoning}\n\n"
            "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>"
            "<|start|>developer<|message|># Instructions\n\n"
            f"{instructions}\n\n<|end|>"
            "<|start|>user<|message|>")


def _preamble(date: str) -> str:
    return harmony_preamble(date, LENS_INSTRUCTION)


def render_prompt(text: str, date=None) -> str:
    """The exact harmony string the official pipeline tokenizes for ``text`` (spec §3.2)."""
    if not isinstance(text, str):
        raise ValueError(f"prompt: expected a string, found {type(text).__name__}")
    rendered = (_preamble(resolve_date(date)) + text + "<|end|>"
                "<|start|>assistant<|channel|>analysis<|message|>" + LENS_ANALYSIS + "<|end|>"
                "<|start|>assistant<|channel|>final<|message|>")
    # The official code renders "...<|message|><|return|>" and keeps what precedes the first <|return|>;
    # a literal <|return|> typed in the prompt therefore cuts the string there.
    return rendered.split("<|return|>", 1)[0]


class LensTokenizer:
    """A ``tokenizers.Tokenizer`` plus the pad id and where it came from (for error messages)."""

    def __init__(self, tokenizer, source: str, pad_id: int):
        self.tokenizer = tokenizer
        self.source = source
        self.pad_id = int(pad_id)

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=True)]

    def __repr__(self):
        return f"LensTokenizer(source={self.source!r}, pad_id={self.pad_id})"


def _bytes_of(data) -> bytes:
    if isinstance(data, torch.Tensor):
        if data.dtype not in (torch.uint8, torch.int8) or data.dim() != 1:
            raise ValueError(f"embedded tokenizer: expected a 1-D uint8/int8 tensor of JSON bytes, found "
                             f"{data.dtype} {tuple(data.shape)}")
        return data.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
    return bytes(data)


def _pad_id_from_config(folder: str, tok) -> int | None:
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(path):
        return None
    cfg = read_json_object(path, "JSON tokenizer config")
    pad = cfg.get("pad_token")
    if isinstance(pad, dict):
        pad = pad.get("content")
    return tok.token_to_id(pad) if isinstance(pad, str) else None


def load_tokenizer(path_or_bytes, check_preamble: bool = True) -> LensTokenizer:
    """Load the o200k_harmony tokenizer from a model/tokenizer folder, a ``tokenizer.json`` path, raw JSON
    bytes/str, or an embedded uint8 tensor (the Comfy-Org NVFP4 file's ``tokenizer_json``).

    A folder may hold ``tokenizer.json`` directly or in ``tokenizer/``. The pad id comes from
    ``tokenizer_config.json`` when present, else ``<|endoftext|>``. With ``check_preamble`` the tokenizer must
    tokenize the Lens preamble to exactly 97 tokens ending in ``<|start|>user<|message|>`` (else the 97-token
    crop would cut the wrong tokens): ValueError naming the source otherwise.
    """
    from tokenizers import Tokenizer

    config_folder = None
    if isinstance(path_or_bytes, (str, os.PathLike)) and not (
            isinstance(path_or_bytes, str) and path_or_bytes.lstrip().startswith("{")):
        path = os.fspath(path_or_bytes)
        if os.path.isdir(path):
            candidates = [os.path.join(path, "tokenizer.json"), os.path.join(path, "tokenizer", "tokenizer.json")]
            found = [c for c in candidates if os.path.isfile(c)]
            if not found:
                raise FileNotFoundError(f"{path}: expected a tokenizer.json in the folder or in its tokenizer/ "
                                        f"subfolder, found none (the real file is the o200k_harmony "
                                        f"tokenizer.json of gpt-oss / Lens)")
            file = found[0]
        elif os.path.isfile(path):
            file = path
        else:
            raise FileNotFoundError(f"{path}: expected a tokenizer folder or tokenizer.json file, found nothing")
        try:
            tok = Tokenizer.from_file(file)
        except Exception as exc:
            raise ValueError(f"{file}: expected a tokenizers JSON file, could not parse it ({exc})") from exc
        source, config_folder = file, os.path.dirname(file)
    else:
        raw = path_or_bytes.encode("utf-8") if isinstance(path_or_bytes, str) else _bytes_of(path_or_bytes)
        try:
            tok = Tokenizer.from_str(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ValueError(f"embedded tokenizer ({len(raw)} bytes): expected UTF-8 tokenizer.json content, found "
                             f"invalid bytes ({exc}); the file is corrupt. Fix: download it again") from None
        except Exception as exc:
            raise ValueError(f"embedded tokenizer ({len(raw)} bytes): expected tokenizer.json content, could "
                             f"not parse it ({exc})") from exc
        source = f"<embedded tokenizer_json, {len(raw)} bytes>"
    tok.no_truncation()  # we truncate ourselves (with a warning) and pad ourselves
    tok.no_padding()
    pad_id = _pad_id_from_config(config_folder, tok) if config_folder else None
    if pad_id is None:
        pad_id = tok.token_to_id(DEFAULT_PAD_TOKEN)
    if pad_id is None:
        pad_id = DEFAULT_PAD_ID
    lens_tok = LensTokenizer(tok, source, pad_id)
    if check_preamble:
        check_tokenizer(lens_tok)
    return lens_tok


def check_tokenizer(tokenizer: LensTokenizer, date=None) -> None:
    """The Lens crop assumes the preamble is exactly 97 tokens ending in ``<|start|>user<|message|>``."""
    ids = tokenizer.encode([_preamble(resolve_date(date))])[0]
    start, message = (tokenizer.tokenizer.token_to_id(t) for t in ("<|start|>", "<|message|>"))
    if len(ids) != PREAMBLE_TOKENS or start is None or ids[-3] != start or ids[-1] != message:
        raise ValueError(
            f"{tokenizer.source}: expected an o200k_harmony tokenizer (gpt-oss / Lens tokenizer.json) that "
            f"tokenizes the Lens preamble into {PREAMBLE_TOKENS} tokens ending in <|start|>user<|message|>, "
            f"found {len(ids)} tokens (last ids {ids[-3:]}); the 97-token crop would be wrong with it")


def check_text(text, name: str = "prompt") -> str:
    """``text`` if it is a string that encodes to UTF-8; ValueError otherwise (a lone surrogate comes from bytes
    that were not UTF-8, e.g. a shell argument or file in another encoding, and would crash the tokenizer)."""
    if not isinstance(text, str):
        raise ValueError(f"{name}: expected a string, found {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{name}: expected valid UTF-8 text, found the undecodable character {text[exc.start]!r} "
                         f"at position {exc.start} (bytes in another encoding); fix: save or pass the text as "
                         f"UTF-8, or remove that character") from None
    return text


def _as_prompt_list(prompts) -> list[str]:
    if isinstance(prompts, str):
        return [check_text(prompts)]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"prompts: expected a string or a non-empty list of strings, found {prompts!r:.80}")
    return [check_text(p, f"prompts[{i}]") for i, p in enumerate(prompts)]


def tokenize(tokenizer: LensTokenizer, prompts, date=None, max_length: int = MAX_SEQUENCE_LENGTH):
    """Token ids ``[B, T]`` int64 and mask ``[B, T]`` bool (True = real token) of the rendered prompts.

    Right truncation at ``max_length`` tokens (preamble included) with a warning saying how many tokens were
    dropped; right padding with the tokenizer's pad id to the longest prompt of the batch.
    """
    if not isinstance(tokenizer, LensTokenizer):
        raise ValueError(f"tokenizer: expected a LensTokenizer from lens_core.prompt.load_tokenizer, found "
                         f"{type(tokenizer).__name__}")
    if not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length: expected a positive int, found {max_length!r}")
    prompts = _as_prompt_list(prompts)
    date = resolve_date(date)
    seqs = tokenizer.encode([render_prompt(p, date) for p in prompts])
    for i, ids in enumerate(seqs):
        if len(ids) > max_length:
            warnings.warn(f"prompt {i} is {len(ids)} tokens long with the template; truncated to {max_length} "
                          f"tokens: {len(ids) - max_length} tokens dropped from the end", stacklevel=2)
            seqs[i] = ids[:max_length]
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = True
    return ids, mask


def crop_features(features, mask, offset: int = PREAMBLE_TOKENS):
    """Drop the first ``offset`` positions of each ``[B, T, D]`` feature and of the ``[B, T]`` mask; when
    ``T <= offset`` the result is zero-length (``[B, 0, D]`` zeros, ``[B, 0]`` mask), as the official code."""
    if mask.shape[1] > offset:
        return [f[:, offset:] for f in features], mask[:, offset:].bool()
    return ([f.new_zeros(f.shape[0], 0, f.shape[2]) for f in features],
            torch.zeros(mask.shape[0], 0, dtype=torch.bool, device=mask.device))


def encode_prompts(text_encoder, tokenizer: LensTokenizer, prompts, date=None,
                   max_length: int = MAX_SEQUENCE_LENGTH, device=None):
    """Encode prompts into Lens text features: ``(list of [B, S, D] per selected layer, mask [B, S] bool)``,
    cropped at 97 and padded on the right (pad positions keep their features but are False in the mask).

    ``text_encoder(input_ids, attention_mask)`` must return the selected-layer outputs (``LensTextEncoder``).
    ``device``: where ids go (default: the device of the encoder's first parameter).
    """
    ids, mask = tokenize(tokenizer, prompts, date=date, max_length=max_length)
    if device is None:
        param = next(iter(text_encoder.parameters()), None) if hasattr(text_encoder, "parameters") else None
        device = param.device if param is not None and param.device.type != "meta" else torch.device("cpu")
    with torch.no_grad():
        feats = text_encoder(ids.to(device), mask.to(device))
        return crop_features(list(feats), mask.to(feats[0].device))


def empty_negative(features, mask):
    """The official empty-negative conditioning: zeros of each feature's shape and an all-False mask."""
    return [torch.zeros_like(f) for f in features], torch.zeros_like(mask, dtype=torch.bool)
