"""The prompt enhancer: the official Lens "reasoner" run locally on the GPT-OSS text encoder's own weights.

Facts: ../shared/docs/lora_gguf_reasoner.md §3 and text_encoder_spec.md §6 (official ``lens/reasoner.py``).

- The text encoder's own weights generate text through a :class:`lens_core.generator.TextGenerator`, which
  references the encoder's layers and owns what the feature encoder never loads (decoder layers after the last
  selected one, the final norm ``model.norm`` and ``lm_head``: 1.16 GB in bf16 for GPT-OSS-20B), its KV cache
  and its kept prompt prefix. :func:`generator_for` keeps one per live encoder; :func:`load_generation_weights`
  loads its weights from the encoder's checkpoint. The encoder itself is never modified; the experts stay packed
  and nothing already loaded is copied. Every function here takes an encoder or a generator.
- :func:`generate`: the prompt is prefilled in one pass, then one token per step with a KV cache
  (:class:`lens_core.text_encoder.KVCache`: sinks, the sliding window on alternating layers, YaRN RoPE at any
  position). ``temperature == 0`` is greedy; otherwise the logits are divided by the temperature, cut to the
  ``top_k`` best (50: transformers' default, which the official ``generate`` call inherits) and sampled with a
  CPU ``torch.Generator`` seeded by ``seed`` (so a seed gives the same text on any device). Generation stops
  at an end-of-sequence id (``generation_config.json``'s, default ``<|return|>``, ``<|endoftext|>``, ``<|call|>``)
  or after ``max_new_tokens``.
- :func:`enhance`: the official conversation (system = the official rewriter prompt + its "keep any reasoning
  private" sentence, user = the prompt) in the harmony template with ``Reasoning: low``, temperature 0.7,
  ``max_new_tokens`` 4096 (the official defaults; a smaller budget is an option: GPT-OSS at ``Reasoning: low``
  usually answers in a few hundred tokens, and a cut-off answer falls back to the original prompt), then the
  official clean-up (:func:`clean_output`). The system prompt is data: ``data/lens_reasoner_prompt.json``
  (with its source and MIT notice). The template date is pinned like the encoder's (``prompt.resolve_date``).
"""
from __future__ import annotations

import functools
import json
import os
import re
import warnings
import weakref

import torch

from . import prompt as lens_prompt
from .generator import TextGenerator
from .text_encoder import LensTextEncoder

DEFAULT_MAX_NEW_TOKENS = 4096      # official PromptReasoner default
DEFAULT_TEMPERATURE = 0.7          # official PromptReasoner default
DEFAULT_TOP_K = 50                 # transformers' generate default (the official call sets none)
DEFAULT_EOS_IDS = (200002, 199999, 200012)   # openai/gpt-oss-20b generation_config.json: <|return|> <|endoftext|> <|call|>
#: Token budget of the prompt to rewrite (the official code has none). Lens reads at most 512 tokens of any
#: prompt (template included), so a longer input is not a prompt to rewrite; the cut keeps prefill time bounded
#: (a 100 000-character prompt would otherwise be prefilled whole: minutes on a CPU). Longer prompts are cut at
#: the end with a warning; ``max_prompt_tokens`` changes it.
MAX_PROMPT_TOKENS = 1024
#: Characters read before tokenizing (cut first, with the same warning): 64 per budget token, far more than any
#: tokenizer needs, so the first ``MAX_PROMPT_TOKENS`` tokens are the same; bounds the tokenizer's time too.
CHARS_PER_TOKEN_BOUND = 64
REASONING = "low"
DATA_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "lens_reasoner_prompt.json")
ASSISTANT_OPEN = "<|end|><|start|>assistant"


# ------------------------------------------------------------------------------------------------------------
# model input data


@functools.lru_cache(maxsize=None)
def reasoner_data() -> dict:
    """The official reasoner's system prompt and local-path sentence (``data/lens_reasoner_prompt.json``)."""
    with open(DATA_FILE, encoding="utf-8") as f:
        data = json.load(f)
    for key in ("system_prompt", "local_suffix", "joiner"):
        if not isinstance(data.get(key), str) or (key != "joiner" and not data[key].strip()):
            raise ValueError(f"{DATA_FILE}: expected a non-empty string {key!r}; the data file is damaged")
    return data


def system_message() -> str:
    """The system message of the official local path: the rewriter prompt, a blank line, the privacy sentence."""
    d = reasoner_data()
    return d["system_prompt"] + d["joiner"] + d["local_suffix"]


def render_parts(date=None) -> tuple[str, str]:
    """(text before the prompt, text after it) of the rendered enhancer conversation: the harmony template with
    ``Reasoning: low``, the system message as developer instructions, and the open assistant turn."""
    return (lens_prompt.harmony_preamble(lens_prompt.resolve_date(date), system_message(), REASONING),
            ASSISTANT_OPEN)


def render_enhance_prompt(text: str, date=None) -> str:
    """The exact string the official reasoner tokenizes for ``text``."""
    if not isinstance(text, str):
        raise ValueError(f"prompt: expected a string, found {type(text).__name__}")
    head, tail = render_parts(date)
    return head + text + tail


# ------------------------------------------------------------------------------------------------------------
# weights


_GENERATORS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def generator_for(model) -> TextGenerator:
    """The :class:`~lens_core.generator.TextGenerator` of ``model``: ``model`` itself if it is one, else the one
    kept for this text encoder (created on first use; it lives as long as the encoder and does not keep it
    alive). Its weights are loaded by :func:`load_generation_weights`."""
    if isinstance(model, TextGenerator):
        return model
    if not isinstance(model, LensTextEncoder):
        raise ValueError(f"expected a LensTextEncoder or a TextGenerator, found {type(model).__name__}")
    gen = _GENERATORS.get(model)
    if gen is None:
        gen = _GENERATORS[model] = TextGenerator(model, weak=True)
    return gen


def load_generation_weights(model, path=None, device=None) -> TextGenerator:
    """The generator of ``model`` (an encoder or a generator, :func:`generator_for`) with its weights loaded:
    the decoder layers after the encoder's, ``model.norm`` and ``lm_head`` from ``path`` (default: the
    checkpoint the encoder was loaded from) onto ``device`` (default: where the embedding is). Idempotent; the
    encoder is never modified; on failure the generator stays unloaded.

    The diffusers ``text_encoder/`` folder has ``lm_head``, a GPT-OSS GGUF has it as ``output.weight`` (kept
    quantized if stored so); the Comfy-Org NVFP4 file has none (a CheckpointError says which file to use)."""
    return generator_for(model).load_weights(path, device)


def default_eos_ids(model) -> tuple[int, ...]:
    """End-of-sequence ids: ``generation_config.json`` beside the encoder's checkpoint (``eos_token_id``, an int
    or a list), else the real GPT-OSS ones."""
    from .jsonfile import read_json_object

    encoder = model.encoder if isinstance(model, TextGenerator) else model
    info = getattr(encoder, "lens_checkpoint", None)
    path = getattr(info, "path", None)
    if path:
        folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        cfg = os.path.join(folder, "generation_config.json")
        if os.path.isfile(cfg):
            ids = read_json_object(cfg, "generation config").get("eos_token_id")
            ids = [ids] if isinstance(ids, int) else ids
            if isinstance(ids, list) and ids and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                     for i in ids):
                return tuple(ids)
            raise ValueError(f"{cfg}: expected eos_token_id as a non-negative int or a non-empty list of them, "
                             f"found {ids!r}")
    return DEFAULT_EOS_IDS


# ------------------------------------------------------------------------------------------------------------
# generation


def _check_number(name, value, lo, hi=None, integer=False):
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok_type or isinstance(value, bool) or value != value or value < lo or (hi is not None and value > hi):
        kind = "an int" if integer else "a finite number"
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name}: expected {kind} {rng}, found {value!r}")
    return value


def _device_of(gen: TextGenerator):
    for p in gen.encoder.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _pick(logits: torch.Tensor, temperature: float, top_k: int, generator) -> torch.Tensor:
    """Next ids ``[B]`` from fp32 logits ``[B, V]``: argmax, or temperature + top-k sampling on the CPU."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits.cpu() / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(logits.device)


@torch.no_grad()
def generate(model, input_ids, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, temperature: float = 0.0,
             seed=None, *, top_k: int = DEFAULT_TOP_K, eos_token_ids=None, pad_token_id=None, callback=None,
             device=None, output_logits: bool = False, prefix_len: int = 0):
    """Generate up to ``max_new_tokens`` tokens after ``input_ids`` (``[T]`` or ``[B, T]``, no padding) and
    return the new ids ``[B, N]`` (an end-of-sequence id is included, as transformers does; rows that ended
    earlier than others are filled with ``pad_token_id``). ``model``: a TextGenerator or a text encoder (its
    generator, :func:`generator_for`), whose weights must be loaded (:func:`load_generation_weights`).
    ``temperature == 0`` is greedy; otherwise sampling with ``top_k`` and a CPU generator seeded with ``seed``
    (None = a random seed).

    ``callback(done, total)`` runs after every new token (progress; it may raise to interrupt: no weight is
    modified by a run, so everything stays usable). ``output_logits=True`` also returns the fp32 logits
    ``[B, V]`` each step was chosen from.

    ``prefix_len > 0`` (one row only): the first ``prefix_len`` tokens are prefilled as a pass of their own and
    their keys/values are kept by the generator; the next call with the same prefix (same ids, dtype, device and
    weights versions) copies them instead of recomputing (the enhancer's fixed system prompt: ≈ 650 of its
    tokens). As the split is the same either way, a reused prefix gives bit-identical results.
    ``TextGenerator.clear_prefix_cache`` frees it."""
    gen = generator_for(model)
    _check_number("max_new_tokens", max_new_tokens, 1, integer=True)
    _check_number("prefix_len", prefix_len, 0, integer=True)
    _check_number("temperature", temperature, 0.0, 100.0)
    _check_number("top_k", top_k, 0, integer=True)
    if seed is not None:
        _check_number("seed", seed, 0, 2 ** 64 - 1, integer=True)
    if not torch.is_tensor(input_ids) or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids: expected an integer tensor [T] or [B, T], found {type(input_ids).__name__}"
                         f" {getattr(input_ids, 'dtype', '')}")
    ids = input_ids.reshape(1, -1) if input_ids.dim() == 1 else input_ids
    if ids.dim() != 2 or ids.shape[1] < 1 or ids.shape[0] < 1:
        raise ValueError(f"input_ids: expected [T] or [B, T] with T >= 1, found {tuple(input_ids.shape)}")
    vocab = gen.config.vocab_size
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(f"input_ids: expected ids in [0, {vocab}), found [{int(ids.min())}, {int(ids.max())}]")
    limit = gen.config.max_position_embeddings
    if ids.shape[1] + max_new_tokens > limit:
        raise ValueError(f"generate: {ids.shape[1]} prompt + {max_new_tokens} new tokens exceed the model's "
                         f"{limit} positions (max_position_embeddings); shorten the prompt or max_new_tokens")
    eos = torch.tensor(sorted(set(eos_token_ids if eos_token_ids is not None else default_eos_ids(gen))),
                       dtype=torch.long)
    pad = gen.config.pad_token_id if pad_token_id is None else pad_token_id
    device = torch.device(device) if device is not None else _device_of(gen)
    ids = ids.to(device=device, dtype=torch.long)
    if prefix_len and (prefix_len >= ids.shape[1] or ids.shape[0] != 1):
        raise ValueError(f"prefix_len={prefix_len}: expected one row and a prefix shorter than the prompt "
                         f"({ids.shape[1]} tokens, {ids.shape[0]} rows); pass prefix_len=0")
    eos = eos.to(device)
    generator = None
    if temperature > 0:
        generator = torch.Generator(device="cpu")
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(int(seed))
    if not gen.ready:
        raise ValueError("generate: the generator's weights (later layers, final norm, lm_head) are not loaded; "
                         "call lens_core.enhance.load_generation_weights(encoder) first")
    batch = ids.shape[0]
    gen.kv_cache = cache = gen.new_kv_cache(batch, ids.shape[1] + max_new_tokens, device=device)
    try:
        layers = gen.prepare()
        unfinished = torch.ones(batch, dtype=torch.bool, device=device)
        out, step_logits = [], []
        step_input = ids
        if prefix_len:
            gen.prefill_prefix(ids[:, :prefix_len], cache)
            step_input = ids[:, prefix_len:]
        for step in range(max_new_tokens):
            logits = gen._logits_step(step_input, cache, layers) if step else gen.logits_step(step_input, cache)
            if output_logits:
                step_logits.append(logits)
            nxt = _pick(logits, float(temperature), int(top_k), generator)
            nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad))
            out.append(nxt)
            unfinished &= ~torch.isin(nxt, eos)
            if callback is not None:
                callback(step + 1, max_new_tokens)
            if not bool(unfinished.any()):
                break
            step_input = nxt[:, None]
    finally:
        gen.kv_cache = None
        del cache
    result = torch.stack(out, dim=1)
    return (result, step_logits) if output_logits else result


def clear_prefix_cache(model):
    """Free the prompt prefix kept by :func:`generate` (``prefix_len``) for ``model`` (encoder or generator)."""
    generator_for(model).clear_prefix_cache()


# ------------------------------------------------------------------------------------------------------------
# clean-up of the generated text (the official rules, in our own code)

_FINAL_TURN = re.compile(r"<\|start\|>assistant(?:<\|channel\|>final)?<\|message\|>(.*?)(?=<\|return\|>|<\|end\|>|$)",
                         re.DOTALL)
_FINAL_CHANNEL = re.compile(r"<\|channel\|>final<\|message\|>(.*?)(?=<\|return\|>|<\|end\|>|$)", re.DOTALL)
_PLAIN_FINAL = re.compile(r"assistant\s*final\s*", re.IGNORECASE)
_PLAIN_LINE_FINAL = re.compile(r"(?:^|\n)\s*final\s*", re.IGNORECASE)
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_STILL_ANALYSIS = re.compile(r"^(?:analysis|assistant\s*analysis)(?:\b|[a-z])", re.IGNORECASE)
_ANALYSIS_OPENINGS = ("<|channel|>analysis<|message|>", "<|start|>assistant<|channel|>analysis<|message|>")
_MARKERS = ("<|channel|>analysis<|message|>", "<|start|>assistant<|channel|>analysis<|message|>",
            "<|channel|>final<|message|>", "<|start|>assistant<|channel|>final<|message|>",
            "<|start|>assistant<|message|>", "<|return|>", "<|end|>", "<|endoftext|>", "<|im_end|>")


def _last_match(pattern, text):
    found = None
    for found in pattern.finditer(text):
        pass
    return found


def _plain_final(text: str):
    """Text after the last 'assistant final' (special tokens lost in decoding), or after the last line starting
    with 'final' when the text starts with 'analysis'; None when neither applies or nothing follows."""
    m = _last_match(_PLAIN_FINAL, text)
    if m is None and text.lstrip().lower().startswith("analysis"):
        m = _last_match(_PLAIN_LINE_FINAL, text)
    if m is None:
        return None
    return text[m.end():].strip() or None


def clean_output(text: str) -> str:
    """The official clean-up of a decoded reasoner output (special tokens kept): the last ``final`` message
    (assistant turn or channel), ``<think>`` blocks and harmony markers removed, a text still starting with
    "analysis" counts as empty, one wrapping code fence and one pair of wrapping double quotes removed,
    whitespace collapsed. Returns "" when nothing usable is left (the caller then keeps the original prompt).
    One deviation: an output that is only an unfinished analysis message (cut off by ``max_new_tokens``) gives ""
    where the official code would return the analysis text as the prompt."""
    text = text.strip()
    m = _last_match(_FINAL_TURN, text) or _last_match(_FINAL_CHANNEL, text)
    if m is not None:
        text = m.group(1).strip()
    elif text.startswith(_ANALYSIS_OPENINGS) and _plain_final(text) is None:
        # Deviation from the official code, which would return the unfinished analysis text itself: an output
        # that is only an analysis message was cut off by max_new_tokens before its final answer.
        return ""
    else:
        text = _plain_final(text) or text
    text = _THINK.sub("", text).strip()
    if "</think>" in text.lower():
        text = re.split(r"</think>", text, flags=re.IGNORECASE)[-1].strip()
    text = _plain_final(text) or text
    for marker in _MARKERS:
        text = text.replace(marker, "")
    text = text.strip()
    if _STILL_ANALYSIS.match(text):
        return ""
    if text.startswith("```") and text.endswith("```"):
        lines = text.splitlines()
        if len(lines) >= 3:
            text = "\n".join(lines[1:-1]).strip()
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        text = text[1:-1].strip()
    return " ".join(text.split())


# ------------------------------------------------------------------------------------------------------------
# the enhancer


def enhance_ids(tokenizer, text: str, max_new_tokens: int, context: int, date=None,
                max_prompt_tokens: int = MAX_PROMPT_TOKENS) -> torch.Tensor:
    """Token ids ``[1, T]`` of the rendered enhancer conversation. The prompt's own tokens are cut at the end
    (with a warning giving the counts) to ``max_prompt_tokens`` and so that template + prompt +
    ``max_new_tokens`` fit in ``context``."""
    return _enhance_ids(tokenizer, text, max_new_tokens, context, date, max_prompt_tokens)[0]


def _enhance_ids(tokenizer, text, max_new_tokens, context, date, max_prompt_tokens=MAX_PROMPT_TOKENS):
    """(:func:`enhance_ids`, the number of template tokens before the prompt: the same for every prompt)."""
    text = lens_prompt.check_text(text, "prompt")
    _check_number("max_prompt_tokens", max_prompt_tokens, 1, integer=True)
    head, tail = render_parts(date)
    chars = max_prompt_tokens * CHARS_PER_TOKEN_BOUND
    cut_chars = len(text) > chars
    head_ids, prompt_ids, tail_ids = tokenizer.encode([head, text[:chars], tail])
    room = context - max_new_tokens - len(head_ids) - len(tail_ids)
    if room < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: the enhancer template takes "
                         f"{len(head_ids) + len(tail_ids)} tokens, so at most "
                         f"{context - len(head_ids) - len(tail_ids) - 1} new tokens fit in the {context}-token "
                         f"context; lower max_new_tokens")
    keep = min(room, max_prompt_tokens)
    if len(prompt_ids) > keep or cut_chars:
        found = (f"{len(text)} characters (more than {len(prompt_ids)} tokens)" if cut_chars else
                 f"{len(prompt_ids)} tokens")
        why = (f"the enhancer's prompt budget (max_prompt_tokens={max_prompt_tokens}; Lens itself reads at most 512 "
               f"tokens of a prompt)" if keep == max_prompt_tokens else
               f"what fits with the template and {max_new_tokens} new tokens in the {context}-token context")
        dropped = f"{len(prompt_ids) - keep} tokens" if not cut_chars else f"{len(text) - chars} characters and more"
        warnings.warn(f"prompt enhancer: the prompt is {found}; truncated to {min(keep, len(prompt_ids))} tokens, "
                      f"{why} ({dropped} dropped from the end)", UserWarning, stacklevel=3)
        prompt_ids = prompt_ids[:keep]
    return torch.tensor([head_ids + prompt_ids + tail_ids], dtype=torch.long), len(head_ids)


def enhance(model, tokenizer, prompt: str, *, seed=None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
            temperature: float = DEFAULT_TEMPERATURE, top_k: int = DEFAULT_TOP_K, date=None, context=None,
            callback=None, device=None, load_weights: bool = True,
            max_prompt_tokens: int = MAX_PROMPT_TOKENS) -> str:
    """Rewrite ``prompt`` into a long, dense Lens caption with the official reasoner (see the module doc).

    An empty (or whitespace-only) prompt is returned unchanged without running the model; an output with no
    usable final answer (e.g. cut off by ``max_new_tokens`` during its analysis) gives the original prompt.
    ``context``: token budget of template + prompt + new tokens (default: the model's
    ``max_position_embeddings``). ``max_prompt_tokens``: the prompt's own budget (:data:`MAX_PROMPT_TOKENS`;
    a longer prompt is cut at the end with a warning). ``load_weights``: load the generation weights on demand.
    ``prompt`` must be a string of valid UTF-8 (None, or a lone surrogate from undecodable bytes: ValueError)."""
    prompt = lens_prompt.check_text(prompt, "prompt")       # a string, valid UTF-8 (no lone surrogates)
    if not prompt.strip():
        return prompt
    if not isinstance(tokenizer, lens_prompt.LensTokenizer):
        raise ValueError(f"tokenizer: expected a LensTokenizer from lens_core.prompt.load_tokenizer, found "
                         f"{type(tokenizer).__name__}")
    _check_number("max_new_tokens", max_new_tokens, 1, integer=True)
    gen = generator_for(model)
    context = gen.config.max_position_embeddings if context is None else context
    _check_number("context", context, 2, gen.config.max_position_embeddings, integer=True)
    if load_weights:
        gen.load_weights()
    ids, head = _enhance_ids(tokenizer, prompt, max_new_tokens, context, date, max_prompt_tokens)
    # the template's head (system prompt) is prefilled on its own and kept: the next rewrite starts from it
    new = generate(gen, ids, max_new_tokens, temperature, seed, top_k=top_k, pad_token_id=tokenizer.pad_id,
                   callback=callback, device=device, prefix_len=head if 0 < head < ids.shape[1] else 0)
    text = tokenizer.tokenizer.decode(new[0].tolist(), skip_special_tokens=False)
    return clean_output(text) or prompt
