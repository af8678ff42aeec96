"""Memory plan: what each model will hold, what the machine has, and which components are held when (issue 25).

Before anything is loaded, :func:`plan_memory` sizes every component from its checkpoint headers alone (the
loaders build the model exactly as they would load it, parameters on ``meta``: same layers, same dtypes,
nothing read), estimates the working memory of each stage at the requested size, reads the memory available
(``MemAvailable``, a cgroup limit, free VRAM) and picks the first plan that fits:

* ``resident``: every model loaded once and held (the fastest: nothing is ever reloaded);
* ``sequential``: the text encoder is loaded, encodes the prompts and is released before the DiT loads; the
  DiT and the VAE stay. A new prompt loads the encoder again (its load time, ≈ the time to read its file);
* ``minimal``: as ``sequential``, and the DiT is also released before the VAE decodes (the next image
  loads the DiT again).

Weights keep their stored dtype where the compute dtype is wider (:mod:`lens_core.upcast`): an fp32 run of a
bf16 checkpoint holds bf16 weights, so fp32 numerics no longer cost twice the memory. When no plan fits, the
error says what would: ``--dtype bf16`` (fp32 files cast once), a smaller GGUF / MXFP8 / fp8 DiT, a smaller
image.

The estimate of a stage is: the process itself (Python, torch, the tokenizer: :data:`PROCESS_BYTES`) + the
models held + that stage's working memory (activations, the prompt features, latents). The peak of the plan is
the largest stage. Measured against real-size files: BENCHMARKS.md "Memory plan".
"""
from __future__ import annotations

import dataclasses
import os

from .lazy_torch import torch     # importing MODES (the CLI's --memory choices) must not import torch

#: RSS of the CLI process before any model loads: Python + torch + tokenizers/PIL/numpy + the o200k tokenizer
#: (0.48 GB measured after loading it; ru_maxrss 0.54 GB), rounded up.
PROCESS_BYTES = 550_000_000
#: fraction of the available memory a plan may fill (the rest: page cache for reading the files, other programs)
HEADROOM = 0.85
#: memory plans, from the fastest to the smallest (the CLI's --memory choices, LensPipeline's ``memory``)
MODES = ("resident", "sequential", "minimal")
COMPONENT_LABELS = {"text_encoder": "text encoder", "transformer": "DiT", "vae": "VAE"}


@dataclasses.dataclass
class Component:
    name: str
    path: str
    resident: int            # bytes held while loaded
    storage: str             # how the weights are held, in words
    compute_dtype: str
    fp32_bytes: int = 0      # of which fp32 tensors (what --dtype bf16 would halve)


@dataclasses.dataclass
class Stage:
    name: str                # "encode", "sample", "decode"
    held: tuple              # components loaded during this stage
    work: int                # working memory of the stage (activations, features, latents)
    peak: int                # PROCESS_BYTES + held weights + work
    released_after: tuple    # components released when this stage ends


@dataclasses.dataclass
class MemoryPlan:
    mode: str
    device: str
    compute_dtype: str
    components: dict
    stages: list
    peak_bytes: int           # host RAM
    available_bytes: int
    budget_bytes: int
    fits: bool
    vram_peak_bytes: int | None = None
    vram_available_bytes: int | None = None
    offload: bool = False
    notes: list = dataclasses.field(default_factory=list)
    alternatives: dict = dataclasses.field(default_factory=dict)   # mode -> peak bytes

    @property
    def releases(self) -> dict:
        return {s.name: s.released_after for s in self.stages if s.released_after}

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["components"] = {k: dataclasses.asdict(v) for k, v in self.components.items()}
        return d

    def describe(self) -> str:
        """The plan in a few lines (``generate --dry-run``)."""
        gb = _gb
        lines = [f"memory plan: {self.mode} ({_MODE_WORDS[self.mode]}), compute {self.compute_dtype} on "
                 f"{self.device}"]
        for c in self.components.values():
            lines.append(f"  {COMPONENT_LABELS[c.name]:<13} {gb(c.resident):>8}  {c.storage}  ({c.path})")
        lines.append(f"  {'process':<13} {gb(PROCESS_BYTES):>8}  Python + torch + tokenizer")
        for s in self.stages:
            held = " + ".join(COMPONENT_LABELS[c] for c in s.held) or "nothing"
            after = f"; then release {', '.join(COMPONENT_LABELS[c] for c in s.released_after)}" \
                if s.released_after else ""
            lines.append(f"  stage {s.name:<7} holds {held}, working memory {gb(s.work)}: {gb(s.peak)}{after}")
        lines.append(f"  peak estimate {gb(self.peak_bytes)} of {gb(self.available_bytes)} available "
                     f"(plan budget {gb(self.budget_bytes)} = {HEADROOM:.0%})")
        if self.vram_peak_bytes is not None:
            lines.append(f"  GPU: peak estimate {gb(self.vram_peak_bytes)} of {gb(self.vram_available_bytes or 0)} "
                         f"free ({'sequential offload' if self.offload else 'all models on the GPU'})")
        others = ", ".join(f"{m} {gb(p)}" for m, p in self.alternatives.items() if m != self.mode)
        if others:
            lines.append(f"  other plans: {others}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


_MODE_WORDS = {"resident": "all models held", "sequential": "text encoder released after encoding",
               "minimal": "one model at a time"}


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


class MemoryPlanError(ValueError):
    """No plan fits the memory available; the message says what would."""


# ---------------------------------------------------------------------------------------------------------
# machine
# ---------------------------------------------------------------------------------------------------------
def _cgroup_limit() -> int | None:
    """The memory limit of this process's cgroup (v2 ``memory.max`` minus usage), None where there is none."""
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as f:
            rel = next((line.strip().split(":", 2)[2] for line in f if line.startswith("0::")), None)
        if rel is None:
            return None
        base = os.path.join("/sys/fs/cgroup", rel.lstrip("/"))
        with open(os.path.join(base, "memory.max"), encoding="utf-8") as f:
            raw = f.read().strip()
        if raw == "max":
            return None
        with open(os.path.join(base, "memory.current"), encoding="utf-8") as f:
            used = int(f.read().strip())
        return max(0, int(raw) - used)
    except (OSError, ValueError, StopIteration):
        return None


def available_ram() -> int:
    """Bytes of RAM this process can still use: ``MemAvailable`` (Linux), capped by a cgroup limit; elsewhere
    the physical memory (``os.sysconf``), else 8 GB."""
    avail = None
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            avail = 8 << 30
    limit = _cgroup_limit()
    return min(avail, limit) if limit is not None else avail


def available_vram(device) -> int | None:
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return int(torch.cuda.mem_get_info(device)[0])


# ---------------------------------------------------------------------------------------------------------
# sizes
# ---------------------------------------------------------------------------------------------------------
def module_bytes(module) -> int:
    """Bytes of a module's parameters and buffers (``meta`` tensors counted by shape and dtype)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _storage_words(module, compute: torch.dtype) -> str:
    from .hardware import dtype_name

    counts: dict = {}
    for p in module.parameters():
        counts[p.dtype] = counts.get(p.dtype, 0) + p.numel() * p.element_size()
    main = sorted(counts.items(), key=lambda kv: -kv[1])
    words = ", ".join(f"{'packed 4/8-bit' if dt == torch.uint8 else dtype_name(dt)} {_gb(n)}" for dt, n in main[:3])
    narrow = [dt for dt in counts if dt.is_floating_point and dt.itemsize < compute.itemsize]
    if narrow and compute == torch.float32:
        words += "; stored weights kept, upcast to fp32 per layer"
    return words


def _vae_resident(path: str, dtype: torch.dtype) -> int:
    """Bytes of the VAE once loaded: every float tensor in ``dtype`` (the VAE loader casts), others as stored."""
    from . import checkpoints as ck
    from .checkpoints.safetensors import ST_DTYPES

    source = ck.open_source(path, "vae")
    try:
        total = 0
        for k in source.keys():
            n = 1
            for d in source.shape(k):
                n *= d
            st = ST_DTYPES.get(source.dtype(k))
            total += n * (dtype.itemsize if st is None or st.is_floating_point else st.itemsize)
        return total
    finally:
        source.close()


def _fp32_bytes(module) -> int:
    return sum(p.numel() * 4 for p in module.parameters() if p.dtype == torch.float32)


def component_sizes(paths: dict, dtype: torch.dtype, *, fp8=False, storage="stored", variant=None,
                    configs: dict | None = None) -> tuple[dict, dict]:
    """({component: Component}, facts) from the headers only: the DiT and the text encoder are built as their
    loaders would build them, with parameters on ``meta``. ``facts``: the DiT config and variant, the text
    encoder config (for the working-memory estimates)."""
    from . import checkpoints as ck
    from .hardware import dtype_name

    configs = configs or {}
    dit = ck.load_transformer(paths["transformer"], dtype=dtype, fp8=fp8, variant=variant, storage=storage,
                              config=configs.get("transformer"), meta=True)
    te = ck.load_text_encoder(paths["text_encoder"], dtype=dtype, storage=storage, meta=True,
                              config=configs.get("text_encoder"),
                              selected_layers=dit.lens_checkpoint.config["selected_layer_index"])
    comps = {
        "text_encoder": Component("text_encoder", os.fspath(paths["text_encoder"]), module_bytes(te),
                                  _storage_words(te, dtype), dtype_name(dtype), _fp32_bytes(te)),
        "transformer": Component("transformer", os.fspath(paths["transformer"]), module_bytes(dit),
                                 _storage_words(dit, dtype), dtype_name(dtype), _fp32_bytes(dit)),
        "vae": Component("vae", os.fspath(paths["vae"]), _vae_resident(paths["vae"], dtype),
                         f"{dtype_name(dtype)} (small; cast at load)", dtype_name(dtype)),
    }
    facts = {"dit_config": dit.config, "variant": dit.lens_checkpoint.variant, "te_config": te.config,
             "te_layers": len(te.model.layers)}
    return comps, facts


# ---------------------------------------------------------------------------------------------------------
# working memory of each stage
# ---------------------------------------------------------------------------------------------------------
def encode_work(te_config, dtype: torch.dtype, tokens: int = 512, prompts: int = 2) -> int:
    """Text encoding of one prompt of at most ``tokens`` tokens (positive, then negative): the residual stream
    and its temporaries, the attention logits (fp32, with the sink column), the routed experts' activations,
    and the four kept feature layers of every prompt."""
    from .prompt import PREAMBLE_TOKENS

    h, heads, inter = te_config.hidden_size, te_config.num_attention_heads, te_config.intermediate_size
    k = te_config.num_experts_per_tok
    size = dtype.itemsize
    stream = tokens * h * size * 12
    attn = heads * tokens * (tokens + 1) * 4 * 3
    experts = tokens * k * 2 * inter * 4 * 3
    features = prompts * 4 * (tokens - PREAMBLE_TOKENS) * h * size
    return stream + attn + experts + features


def sample_work(dit_config, dtype: torch.dtype, height: int, width: int, text_tokens: int, batch: int,
                cfg: float) -> int:
    """One denoising forward (exact path: CFG as a batch of two): per-block activations of the joint sequence
    (qkv, attention output, gated MLP hidden), the attention of one block, the text features and latents."""
    rows = batch * (2 if cfg != 1.0 else 1)
    s_img = (height // 16) * (width // 16)
    s = s_img + text_tokens
    width_ = dit_config.width
    size = dtype.itemsize
    block = rows * s * (10 * width_ + 3 * dit_config.mlp_hidden) * size
    attn = rows * dit_config.num_attention_heads * s * min(s, 1024) * 4
    feats = rows * text_tokens * dit_config.enc_hidden_dim * dit_config.num_text_layers * size * 2
    latents = rows * s_img * dit_config.in_channels * 4 * 6
    return block + attn + feats + latents


def decode_work(dtype: torch.dtype, height: int, width: int, batch: int, available: int) -> int:
    """The VAE decode's activations (:meth:`lens_core.vae.LensVAE.activation_bytes`, sized for the real FLUX.2
    VAE), one 512-pixel tile's worth when the VAE will tile (it tiles when the untiled estimate exceeds half the
    available memory), + the uint8/float image."""
    from .vae import REAL_VAE_CONFIG, LensVAE

    vae = LensVAE(REAL_VAE_CONFIG, device="meta")
    full = vae.activation_bytes(batch, height, width, dtype)
    if (height > vae.tile_size or width > vae.tile_size) and full > available // 2:
        full = vae.activation_bytes(batch, vae.tile_size, vae.tile_size, dtype) * 2
    return full + batch * height * width * 3 * (4 + 1)


# ---------------------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------------------
def _stages(mode: str, sizes: dict, work: dict) -> list:
    te, dit, vae = sizes["text_encoder"], sizes["transformer"], sizes["vae"]
    if mode == "resident":
        held = ("text_encoder", "transformer", "vae")
        plan = [("encode", held, ()), ("sample", held, ()), ("decode", held, ())]
    elif mode == "sequential":
        plan = [("encode", ("text_encoder",), ("text_encoder",)), ("sample", ("transformer",), ()),
                ("decode", ("transformer", "vae"), ())]
    else:
        plan = [("encode", ("text_encoder",), ("text_encoder",)), ("sample", ("transformer",), ("transformer",)),
                ("decode", ("vae",), ())]
    held_bytes = {"text_encoder": te, "transformer": dit, "vae": vae}
    out = []
    for name, held, released in plan:
        w = work[name] + (work["features"] if name != "encode" else 0)
        out.append(Stage(name, held, w, PROCESS_BYTES + sum(held_bytes[c] for c in held) + w, released))
    if mode == "resident":      # everything loads before the first stage
        load_peak = PROCESS_BYTES + te + dit + vae
        out[0].peak = max(out[0].peak, load_peak)
    return out


def plan_memory(paths: dict, dtype: torch.dtype, device, *, height: int, width: int, cfg: float = 5.0,
                batch: int = 1, fp8=False, storage="stored", variant=None, configs=None, memory="auto",
                offload=None, available: int | None = None, vram: int | None = None) -> MemoryPlan:
    """The plan for generating ``batch`` image(s) of ``height``×``width`` at guidance ``cfg`` (1 = one forward per
    step) with the checkpoints ``paths`` in ``dtype`` on ``device``. ``memory``: "auto" (the first of
    :data:`MODES` that fits) or a mode (used as asked; ``fits`` tells whether it does). ``available`` / ``vram``
    replace the machine's figures (tests, what-if). Raises :class:`MemoryPlanError` (``memory="auto"``) when
    no plan fits, naming what would."""
    from .hardware import dtype_name

    if memory != "auto" and memory not in MODES:
        raise ValueError(f"memory: expected 'auto' or one of {list(MODES)}, found {memory!r}")
    device = torch.device(device)
    comps, facts = component_sizes(paths, dtype, fp8=fp8, storage=storage, variant=variant, configs=configs)
    if cfg is None:
        cfg = 1.0 if facts["variant"] == "turbo" else 5.0
    avail = available_ram() if available is None else int(available)
    budget = int(avail * HEADROOM)
    from .prompt import MAX_SEQUENCE_LENGTH, PREAMBLE_TOKENS

    text_tokens = MAX_SEQUENCE_LENGTH - PREAMBLE_TOKENS
    te_cfg, dit_cfg = facts["te_config"], facts["dit_config"]
    features = 2 * batch * 4 * text_tokens * te_cfg.hidden_size * dtype.itemsize
    work = {"encode": encode_work(te_cfg, dtype),
            "sample": sample_work(dit_cfg, dtype, height, width, text_tokens, batch, cfg),
            "decode": decode_work(dtype, height, width, batch, avail),
            "features": features}
    sizes = {k: c.resident for k, c in comps.items()}
    on_gpu = device.type == "cuda"
    if on_gpu and offload is None:
        offload = True
    host = dict(sizes)
    gpu_peak = gpu_avail = None
    if on_gpu:
        gpu_avail = available_vram(device) if vram is None else int(vram)
        if offload:     # one model at a time on the GPU; the host holds what the plan holds
            gpu_peak = max(sizes[c] + work[s] for c, s in (("text_encoder", "encode"), ("transformer", "sample"),
                                                            ("vae", "decode")))
        else:           # everything on the GPU, the host keeps nothing
            gpu_peak = sum(sizes.values()) + max(work["encode"], work["sample"], work["decode"])
            host = {k: 0 for k in sizes}
        work_host = dict(work, encode=0, sample=0, decode=0)
    else:
        work_host = work
    plans = {m: _stages(m, host, work_host) for m in MODES}
    peaks = {m: max(s.peak for s in st) for m, st in plans.items()}
    gpu_fits = gpu_peak is None or gpu_avail is None or gpu_peak <= gpu_avail
    if memory == "auto":
        mode = next((m for m in MODES if peaks[m] <= budget), None)
        if mode is None or not gpu_fits:
            raise MemoryPlanError(_no_fit_message(comps, peaks, budget, avail, dtype, height, width, facts,
                                                  gpu_peak, gpu_avail, plans["minimal"]))
    else:
        mode = memory
    notes = []
    if mode != "resident":
        notes.append(f"the text encoder ({_gb(sizes['text_encoder'])}) is loaded again for each new prompt "
                     f"(about the time to read {_gb(sizes['text_encoder'])} from disk); the same prompt reuses "
                     f"its features")
    if mode == "minimal":
        notes.append(f"the DiT ({_gb(sizes['transformer'])}) is loaded again for each image after the first")
    if storage == "stored" and dtype == torch.float32 and any("upcast" in c.storage for c in comps.values()):
        notes.append("fp32 compute on bf16-stored weights: each layer upcasts its weight per call (bit-identical "
                     "to an fp32 copy of the same weights)")
    return MemoryPlan(mode=mode, device=str(device), compute_dtype=dtype_name(dtype), components=comps,
                      stages=plans[mode], peak_bytes=peaks[mode], available_bytes=avail, budget_bytes=budget,
                      fits=peaks[mode] <= budget and gpu_fits, vram_peak_bytes=gpu_peak,
                      vram_available_bytes=gpu_avail, offload=bool(offload) if on_gpu else False, notes=notes,
                      alternatives=peaks)


def _no_fit_message(comps, peaks, budget, avail, dtype, height, width, facts, gpu_peak, gpu_avail,
                    stages) -> str:
    sizes = ", ".join(f"{COMPONENT_LABELS[c.name]} {_gb(c.resident)}" for c in comps.values())
    if gpu_peak is not None and gpu_avail is not None and gpu_peak > gpu_avail:
        head = (f"the largest model with its working memory needs {_gb(gpu_peak)} of GPU memory, "
                f"{_gb(gpu_avail)} is free")
    else:
        head = (f"even one model at a time needs {_gb(peaks['minimal'])} of RAM, the plan budget is {_gb(budget)} "
                f"({HEADROOM:.0%} of {_gb(avail)} available)")
    worst = max(stages, key=lambda s: s.peak).name
    fixes = []
    big32 = [c for c in comps.values() if c.fp32_bytes > 1e9]
    if dtype == torch.float32 and big32:
        fixes.append(f"--dtype bf16 (the fp32 weights of the {', '.join(COMPONENT_LABELS[c.name] for c in big32)} "
                     f"are then held in bf16: half their memory)")
    if worst == "encode":
        fixes.append(f"free memory: the text encoder alone needs {_gb(stages[0].peak)} (no smaller GPT-OSS-20B "
                     f"file exists); close other programs or use a machine with more RAM")
    else:
        if comps["transformer"].resident > 3e9:
            fixes.append("a smaller DiT file: a GGUF (Q4_K ≈ 2.3 GB, Q8_0 ≈ 4.4 GB), the MXFP8 file (≈ 5.5 GB) or "
                         "--fp8")
        if height * width > 1024 * 1024:
            fixes.append(f"a smaller image than {width}×{height} (e.g. --aspect 1:1 --base 1024)")
    return f"memory: {head}. Models: {sizes}. Fix: " + "; ".join(fixes)
