"""LensPipeline: the standalone Python API (no ComfyUI) — load the three models + tokenizer, generate images.

Flow (lens_dit_spec.md §4 "Call flow"): size → encode prompts (97-token crop) → repeat per image → noise →
flow-match sampling with CFG (``lens_core.sampling.sample``) → BN un-normalise + VAE decode → uint8 (truncating,
as the official pipeline) → PIL. With ``exact=True`` (default) every step follows the reference computation,
so a run with the golden noise reproduces the official pipeline's latents and images.

Sequential offload (``offload=True``, the default on CUDA): every model lives on the CPU and only the one in
use sits on the accelerator (text encoder → DiT → VAE), so peak VRAM is the largest single model.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os

import torch

from . import checkpoints as ck
from . import config as cf
from .config import aspect_buckets, pack_latents, unpack_latents, variant_defaults, variant_name
from .checks import missing_path
from .hardware import choose_dtype, resolve_device
from .images import check_image_range, mask_values, open_image, to_rgb, to_tensor
from .memory import MODES
from .prompt import DEFAULT_TEMPLATE_DATE, check_text, encode_prompts, resolve_date
from .sampling import make_noise, prepare_mask, sample
from .schedules import build_sigmas, format_schedule, parse_schedule

COMPONENTS = ("transformer", "text_encoder", "vae", "tokenizer")
_LABELS = {"transformer": "DiT", "text_encoder": "text encoder", "vae": "VAE"}
#: img2img strength used when an init image is given without ``denoise``.
DEFAULT_IMG2IMG_DENOISE = 0.6


@dataclasses.dataclass
class LensOutput:
    images: list                 # PIL images, one per sample
    latents: torch.Tensor        # final packed latents [B, S_img, 128] (run dtype, BN-normalised space)
    uint8: torch.Tensor          # [B, H, W, 3] uint8 (the PIL pixels)
    parameters: dict             # everything needed to reproduce the call
    image_parameters: list = dataclasses.field(default_factory=list)  # per image: its prompt, seed, batch_index


def _progress(enabled, total, desc):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a requirement, but never fail a run for a progress bar
        return None
    return tqdm(total=total, desc=desc, leave=False)


class LensPipeline:
    """Text-to-image (and img2img) with Lens, Lens-Turbo or Lens-Base."""

    def __init__(self, transformer, text_encoder, tokenizer, vae, *, variant="lens", dtype=torch.bfloat16,
                 device="cpu", offload=False, exact=True, loras=None, enhance=False, loaders=None,
                 memory="resident"):
        # models by component; a None entry with a loader in ``loaders`` is loaded on first use (memory plans
        # "sequential" / "minimal": see lens_core.memory and :meth:`release`)
        self._models = {"transformer": transformer, "text_encoder": text_encoder, "vae": vae}
        self._loaders = dict(loaders or {})
        if memory not in MODES:
            raise ValueError(f"memory: expected one of {', '.join(map(repr, MODES))}, found {memory!r}")
        self.memory = memory
        self.tokenizer = tokenizer
        self.variant = variant_name(variant)
        self.dtype = dtype
        self.device = resolve_device(device)
        self.offload = bool(offload)
        self.exact = exact
        self.progress = False
        # prompt enhancer (the official reasoner, lens_core.enhance): False, True, or a dict of enhance() options
        if not isinstance(enhance, (bool, dict)):
            raise ValueError(f"enhance: expected True/False or a dict of lens_core.enhance.enhance options, found "
                             f"{type(enhance).__name__}")
        self.enhance_options = (dict(enhance) if isinstance(enhance, dict) else {}) if enhance else None
        self.loras: list = []           # [(file name, strength)] applied to the DiT
        self._lora_items: list = []     # [(LoraAdapter, strength)], applied again whenever the DiT is (re)loaded
        self._lora_cache: dict = {}
        for name, m in self._models.items():
            if m is not None:
                self._adopt(name, m)
        if loras:
            self.set_loras(loras)

    # ---- components held, loaded on use, released ------------------------------------------------
    def _adopt(self, name, module):
        if name == "vae" and hasattr(module, "exact"):
            module.exact = self.exact     # reference mode decodes like the official VAE too (bf16 bit-exact)
        if not self.offload:
            module.to(self.device)
        return module

    def _get(self, name):
        module = self._models[name]
        if module is None and name in self._loaders:
            import sys
            import time

            t0 = time.perf_counter()
            if self.progress:
                print(f"loading the {_LABELS[name]} ...", file=sys.stderr, flush=True)
            module = self._adopt(name, self._loaders[name]())
            self._models[name] = module
            if name == "transformer" and self._lora_items:
                self._apply_loras(self._lora_items)
            if self.progress:
                print(f"loaded the {_LABELS[name]} in {time.perf_counter() - t0:.1f} s", file=sys.stderr,
                      flush=True)
        return module

    def release(self, name) -> bool:
        """Drop the model ``name`` ("text_encoder", "transformer", "vae") to free its memory; it is loaded again
        (from its checkpoint, LoRAs re-applied) on next use. Only for a pipeline that can reload it
        (``from_pretrained``); returns whether it was released."""
        if self._models.get(name) is None or name not in self._loaders:
            return False
        self._models[name] = None
        import gc

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return True

    def _release_after(self, stage):
        """Release what the memory plan frees after ``stage`` ("encode", "sample")."""
        if stage == "encode" and self.memory in ("sequential", "minimal"):
            self.release("text_encoder")
        elif stage == "sample" and self.memory == "minimal":
            self.release("transformer")

    transformer = property(lambda self: self._get("transformer"),
                           lambda self, m: self._models.__setitem__("transformer", m))
    text_encoder = property(lambda self: self._get("text_encoder"),
                            lambda self, m: self._models.__setitem__("text_encoder", m))
    vae = property(lambda self: self._get("vae"), lambda self, m: self._models.__setitem__("vae", m))

    def set_loras(self, loras=()):
        """Replace the DiT's LoRAs: ``loras`` = [(path or LoraAdapter, strength) | path, …] (empty = none).

        The previous adapters are removed first (merged weights get their exact originals back), so the base
        weights are never re-read; each file is read once and kept for later calls."""
        from . import lora as lo

        items = []
        for item in loras or ():
            src, strength = (item, 1.0) if isinstance(item, (str, os.PathLike, lo.LoraAdapter)) else item
            strength = lo.check_strength(strength, f"strength of {src}")
            if not isinstance(src, lo.LoraAdapter):
                key = os.path.abspath(os.fspath(src))
                stat = os.stat(key)
                ck_key = (key, stat.st_mtime_ns, stat.st_size)
                if ck_key not in self._lora_cache:
                    self._lora_cache[ck_key] = lo.load_lora(key)
                src = self._lora_cache[ck_key]
            items.append((src, strength))
        if self._models["transformer"] is None:     # not loaded (memory plan): applied when it loads
            self._lora_items = items
            self.loras = [(adapter.name, strength) for adapter, strength in items]
            return
        self._apply_loras(items)

    def _apply_loras(self, items):
        from . import lora as lo

        dit = self._models["transformer"]
        lo.remove_loras(dit)
        self.loras, self._lora_items = [], []
        try:
            for adapter, strength in items:
                layers = lo.apply_lora(dit, adapter, strength)
                self.loras.append((adapter.name, strength))
                if self.progress:
                    import sys

                    print(f"LoRA applied: {adapter.name} at strength {strength:g} ({adapter.format}, "
                          f"{len(layers)} layers of the DiT)", file=sys.stderr, flush=True)
        except Exception:
            lo.remove_loras(dit)      # never leave half a set applied
            self.loras = []
            raise
        self._lora_items = list(items)

    # ---- loading -----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path=None, *, transformer=None, text_encoder=None, vae=None, tokenizer=None,
                        dtype=None, device="auto", offload=None, variant=None, fp8=False,
                        configs: dict | None = None, exact=True, progress=False, loras=None,
                        enhance=False, memory="auto", storage="stored", plan=None) -> "LensPipeline":
        """Load every component (or plan to load each on use).

        ``path``: a diffusers Lens folder (all components), a DiT file/folder (then ``text_encoder`` and ``vae``
        are required), or a dict ``{component: path}``. Keyword paths override single components. Every path is
        checked (:func:`resolve_paths`) before any weight file is opened, and the tokenizer loads first.
        ``dtype``: run dtype of all three models (the official pipeline uses one ``torch_dtype``); None/"auto" =
        chosen from the hardware (:func:`lens_core.hardware.choose_dtype`: bf16 on CUDA with bf16 and on CPUs
        with AMX / AVX512-BF16, else fp32); the choice and its reason are ``pipe.dtype`` / ``pipe.dtype_reason``.
        ``device``: "cpu", "cuda", "auto". ``offload``: sequential offload (default: True on CUDA).
        ``variant``: "lens" / "turbo" / "base" (default: detected from config/metadata/path).
        ``fp8``: store the DiT's block Linears as fp8 e4m3fn. ``configs``: per-component config overrides
        (``{"transformer": {...}, "text_encoder": {...}, "vae": {...}}``, for files without config.json).
        ``loras``: [(path, strength), …] applied to the DiT (see :meth:`set_loras`).
        ``memory``: "auto" (default: the first plan of :func:`lens_core.memory.plan_memory` that fits this
        machine, sized for a 1024² image; ``pipe.memory_plan``), "resident" (load all three now and keep them),
        "sequential" (the text encoder is loaded to encode and released; the DiT and VAE stay) or "minimal"
        (one model at a time). ``plan``: a :class:`lens_core.memory.MemoryPlan` made for the actual request
        (the CLI's), used instead. ``storage``: "stored" (default: bf16/fp16 weights stay so under fp32 compute,
        upcast per layer, same numbers) or "compute" (every float weight cast to ``dtype`` at load).
        """
        paths = resolve_paths(path, transformer=transformer, text_encoder=text_encoder, vae=vae, tokenizer=tokenizer)
        device = resolve_device(device)
        dtype, reason = resolve_dtype(dtype, device)
        if offload is None:
            offload = device.type == "cuda"
        load_device = "cpu" if offload else device
        configs = configs or {}
        check_headers(paths)                              # a misplaced file fails before minutes of loading
        if plan is None and memory == "auto":
            from .memory import plan_memory

            plan = plan_memory(paths, dtype, device, height=1024, width=1024, cfg=None, fp8=fp8, storage=storage,
                               variant=variant, configs=configs, offload=offload)
        mode = plan.mode if plan is not None else memory
        if mode not in MODES:
            raise ValueError(f"memory: expected 'auto', {', '.join(map(repr, MODES))}, found {memory!r}")
        selected = {}

        def load_dit():
            dit = ck.load_transformer(paths["transformer"], dtype=dtype, device=load_device, variant=variant,
                                      fp8=fp8, config=configs.get("transformer"), storage=storage)
            selected["layers"] = dit.lens_checkpoint.config["selected_layer_index"]
            return dit

        def load_te():
            if "layers" not in selected:      # the DiT config names the encoder layers it reads
                selected["layers"] = ck.load_transformer(paths["transformer"], dtype=dtype, variant=variant,
                                                         config=configs.get("transformer"),
                                                         meta=True).lens_checkpoint.config["selected_layer_index"]
            return ck.load_text_encoder(paths["text_encoder"], dtype=dtype, device=load_device,
                                        config=configs.get("text_encoder"), selected_layers=selected["layers"],
                                        storage=storage)

        def load_v():
            return ck.load_vae(paths["vae"], dtype=dtype, device=load_device, config=configs.get("vae"))

        loaders = {"transformer": load_dit, "text_encoder": load_te, "vae": load_v}
        bar = _progress(progress, 4 if mode == "resident" else 1, "load")

        def step(following):
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(following)

        models = {"transformer": None, "text_encoder": None, "vae": None}
        try:
            if bar is not None:
                bar.set_postfix_str("tokenizer")
            tok = ck.load_tokenizer(paths["tokenizer"])    # cheap, and a bad one fails before any weights
            if mode == "resident":
                step("transformer")
                models["transformer"] = load_dit()
                step("text_encoder")
                models["text_encoder"] = load_te()
                step("vae")
                models["vae"] = load_v()
            step("done")
        finally:
            if bar is not None:
                bar.close()                               # also on errors: the message starts a clean line
        if models["transformer"] is not None:
            var = models["transformer"].lens_checkpoint.variant
        else:
            var = ck.load_transformer(paths["transformer"], dtype=dtype, variant=variant, storage=storage,
                                      config=configs.get("transformer"), meta=True).lens_checkpoint.variant
        pipe = cls(models["transformer"], models["text_encoder"], tok, models["vae"], variant=var, dtype=dtype,
                   device=device, offload=offload, exact=exact, enhance=enhance, loaders=loaders, memory=mode)
        pipe.paths = paths
        pipe.progress = progress
        pipe.dtype_reason = reason
        pipe.memory_plan = plan
        if loras:
            pipe.set_loras(loras)
        return pipe

    # ---- helpers -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _on_device(self, module):
        """Sequential offload: ``module`` sits on the execution device only inside this block."""
        if not self.offload:
            yield module
            return
        module.to(self.device)
        try:
            yield module
        finally:
            module.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def resolve_size(self, height=None, width=None, aspect=None, base=None, image=None):
        """(height, width) of a request: see :func:`resolve_size`."""
        return resolve_size(height, width, aspect, base, image)

    def encode(self, prompts, negative_prompt, num_images, template_date):
        """Positive and negative (``None`` = the official empty negative) features and masks per sample.
        ``prompts``: a string or list; ``negative_prompt``: a string or one entry per prompt. The last encoding
        is kept, so the same prompts again (the CLI's images one by one) are not encoded twice."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        negs = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negs) != len(prompts):
            raise ValueError(f"negative_prompt: expected a string or {len(prompts)} entries (one per prompt), "
                             f"got {len(negs)}")
        key = (tuple(prompts), tuple(negs), template_date)
        cached = getattr(self, "_encoded", None)
        if cached is not None and cached[0] == key:
            feats, mask, neg = cached[1]
        else:
            with self._on_device(self.text_encoder) as te:
                feats, mask = encode_prompts(te, self.tokenizer, prompts, date=template_date, device=self.device)
                neg = None
                if any(n.strip() for n in negs):
                    neg = encode_prompts(te, self.tokenizer, negs, date=template_date, device=self.device)
                te = None
            self._encoded = (key, (feats, mask, neg))
            self._release_after("encode")

        def rep(t):
            return t.repeat_interleave(num_images, dim=0)
        feats, mask = [rep(f) for f in feats], rep(mask)
        if neg is not None:
            neg = ([rep(f) for f in neg[0]], rep(neg[1]))
        return feats, mask, neg

    def _init_latents(self, image, height, width, batch):
        """Clean packed latents [batch, S_img, 128] of the init image (an RGB PIL image, resized to the
        generation size, or a [1|batch, 3, H, W] tensor in [−1, 1] of that size)."""
        if not isinstance(image, torch.Tensor):
            from PIL import Image

            if image.size != (width, height):
                image = image.resize((width, height), Image.LANCZOS)
            image = to_tensor(image)
        with self._on_device(self.vae) as vae:
            z = vae.encode(image.to(self.device))
        z = pack_latents(z)
        if z.shape[0] == 1 and batch > 1:
            z = z.expand(batch, -1, -1)
        return z

    def enhance(self, prompt: str, seed=0, max_new_tokens=None, temperature=None, template_date=None,
                **options) -> str:
        """Rewrite ``prompt`` with the official Lens reasoner run on this pipeline's text encoder
        (``lens_core.enhance.enhance``: temperature 0.7, up to 4096 new tokens by default; ``seed`` makes the
        sampling reproducible). ``lm_head`` and the final norm are loaded from the text-encoder checkpoint on the
        first call (the Comfy-Org NVFP4 file has none: use the diffusers ``text_encoder/`` folder)."""
        from . import enhance as enh

        opts = dict(self.enhance_options or {}, **options)
        if max_new_tokens is not None:
            opts["max_new_tokens"] = max_new_tokens
        if temperature is not None:
            opts["temperature"] = temperature
        if not isinstance(prompt, str) or not prompt.strip():
            return enh.enhance(self.text_encoder, self.tokenizer, prompt, load_weights=False)
        gen = enh.load_generation_weights(self.text_encoder, device="cpu" if self.offload else self.device)
        bar = _progress(self.progress, opts.get("max_new_tokens", enh.DEFAULT_MAX_NEW_TOKENS), "enhance")
        user_callback = opts.pop("callback", None)

        def on_token(done, total):
            if bar is not None:
                bar.update(done - bar.n)
            if user_callback is not None:
                user_callback(done, total)

        try:
            with self._on_device(self.text_encoder), self._on_device(gen):     # the generator's own weights too
                return enh.enhance(gen, self.tokenizer, prompt, seed=seed, date=template_date, device=self.device,
                                   callback=on_token, **opts)
        finally:
            if bar is not None:
                bar.close()

    # ---- generation --------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt, negative_prompt="", height=None, width=None, aspect=None, base=None, steps=None,
                 cfg=None, seed=0, num_images=1, latents=None, image=None, denoise=None, mask=None,
                 template_date=DEFAULT_TEMPLATE_DATE, callback=None, batch_index=0,
                 schedule="official") -> LensOutput:
        """Generate images. ``steps``/``cfg`` default to the variant's (lens 20/5, turbo 4/1, base 50/5).

        Every argument is checked (:func:`check_request`: sizes within :data:`lens_core.config.MAX_PIXELS` and
        1:2 … 2:1, at most :data:`~lens_core.config.MAX_BATCH` images, at most
        :data:`~lens_core.config.MAX_STEPS` steps, finite numbers and tensors, a readable init image) before
        anything runs. ``latents``: initial noise as packed tokens [B, S_img, 128] (or a [B, 128, h, w] latent),
        used as given (the official ``latents=``); otherwise seeded noise: the rows ``batch_index`` …
        ``batch_index + B − 1`` of ``make_noise(seed, ...)`` (one draw for the batch; image k of a seed alone:
        ``num_images=1, batch_index=k``). ``image``: img2img from the encoded image (a path, a PIL image of any
        mode, or a [1|B, 3, H, W] tensor in [−1, 1]); ``denoise`` defaults to 0.6 with an image alone and 1.0
        otherwise (with ``denoise=1.0`` and no mask an image only sets the size). ``callback(step, total, latents,
        x0)``. ``mask`` (with ``image``): inpainting by masked denoising, 1 (white) = generate anew, 0 (black) =
        keep the image; a PIL image, a path, or a tensor [H, W] / [B, H, W] in [0, 1] at any resolution (resized
        to the latent grid like ComfyUI does). Works at any ``denoise`` (1 = the masked area from pure noise).
        ``schedule``: a :mod:`lens_core.schedules` name — ``"official"`` (default), ``"simple"`` (ComfyUI's native
        Lens template: ModelSamplingFlux + "simple") or ``"simple:SHIFT"`` (e.g. ``"simple:1.829"``, a native Lens
        MODEL without ModelSamplingFlux).
        """
        from PIL import Image
        from .vae import to_uint8

        req = check_request(prompt, negative_prompt, height=height, width=width, aspect=aspect, base=base,
                            steps=steps, cfg=cfg, seed=seed, num_images=num_images, latents=latents, image=image,
                            denoise=denoise, mask=mask, template_date=template_date, batch_index=batch_index,
                            schedule=schedule)
        d_steps, d_cfg = variant_defaults(self.variant)
        steps = d_steps if req["steps"] is None else req["steps"]
        cfg = d_cfg if req["cfg"] is None else req["cfg"]
        height, width, (gh, gw) = req["height"], req["width"], req["grid"]
        batch, denoise = req["batch"], req["denoise"]

        original_prompts = list(req["prompts"])
        if self.enhance_options is not None:   # only the positive prompts, one at a time (as the official code)
            req["prompts"] = [self.enhance(p, seed=req["seed"] + i, template_date=req["template_date"])
                              for i, p in enumerate(req["prompts"])]
            prompt = req["prompts"][0] if isinstance(prompt, str) else list(req["prompts"])
        feats, mask, neg = self.encode(req["prompts"], req["negatives"], req["num_images"], req["template_date"])
        if req["latents"] is not None:
            noise = req["latents"]
        else:
            noise = make_noise(req["seed"], batch, gh, gw, start=req["batch_index"])
        init = packed_mask = None
        if req["mask"] is not None:
            packed_mask = prepare_mask(req["mask"], batch, gh, gw)
        if req["image"] is not None and (denoise < 1.0 or packed_mask is not None):
            init = self._init_latents(req["image"], height, width, batch)

        bar = _progress(self.progress, steps, "denoise")

        def on_step(step, total, lat, x0):
            if bar is not None:
                bar.total = total
                bar.update(1)
            if callback is not None:
                return callback(step, total, lat, x0)
            return None

        try:
            with self._on_device(self.transformer) as dit:
                final = sample(dit, noise, feats, mask, None if neg is None else neg[0],
                               None if neg is None else neg[1], grid=(gh, gw), cfg=cfg,
                               sigmas=build_sigmas(req["schedule"], steps, gh * gw, denoise),
                               init_latents=init, callback=on_step, exact=self.exact,
                               dtype=self.dtype, device=self.device, mask=packed_mask)
        finally:
            if bar is not None:
                bar.close()
        self._release_after("sample")
        dbar = _progress(self.progress, 1, "decode")
        with self._on_device(self.vae) as vae:
            decoded = vae.decode(unpack_latents(final, gh, gw))
            pixels = to_uint8(decoded).cpu()
        if dbar is not None:
            dbar.update(1)
            dbar.close()
        images = [Image.fromarray(p.numpy()) for p in pixels]
        seeded = req["latents"] is None
        params = {"prompt": prompt, "negative_prompt": negative_prompt, "height": height, "width": width,
                  "original_prompt": None, "steps": steps, "cfg": cfg, "seed": req["seed"] if seeded else None,
                  "num_images": req["num_images"], "batch_index": req["batch_index"] if seeded else None,
                  "denoise": denoise, "schedule": req["schedule"], "inpaint": packed_mask is not None,
                  "template_date": req["template_date"],
                  "variant": self.variant,
                  "dtype": str(self.dtype).replace("torch.", ""), "exact": self.exact,
                  "loras": [{"file": n, "strength": s} for n, s in self.loras]}
        if self.enhance_options is not None:
            params["original_prompt"] = original_prompts[0] if isinstance(prompt, str) else original_prompts
        per_image = []
        for i in range(batch):
            one = dict(params, prompt=req["prompts"][i // req["num_images"]],
                       negative_prompt=req["negatives"][i // req["num_images"]], num_images=1)
            if self.enhance_options is not None:
                one["original_prompt"] = original_prompts[i // req["num_images"]]
            if seeded:
                one["batch_index"] = req["batch_index"] + i
            per_image.append(one)
        return LensOutput(images=images, latents=final, uint8=pixels, parameters=params, image_parameters=per_image)


def resolve_dtype(dtype, device) -> tuple[torch.dtype, str]:
    """(dtype, reason): ``None``/"auto" → :func:`lens_core.hardware.choose_dtype`; else the torch dtype given."""
    if dtype is None or (isinstance(dtype, str) and dtype == "auto"):
        return choose_dtype(device)
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
    if isinstance(dtype, str) and dtype in names:
        dtype = names[dtype]
    if dtype not in (torch.bfloat16, torch.float32, torch.float16):
        raise ValueError(f"dtype: expected 'auto', torch.bfloat16 or torch.float32, found {dtype!r}")
    return dtype, "requested"


def resolve_size(height=None, width=None, aspect=None, base=None, image=None, names=None) -> tuple[int, int]:
    """(height, width): an aspect bucket if ``aspect`` is given (base default 1440), else height and width
    (both), else the init image's size (rounded down to 16; ``image`` = anything with ``.size`` (w, h)),
    else 1024×1024 (the official default). ValueError for a height without a width (or the reverse), an
    aspect together with a height/width, a base without an aspect, or an unknown aspect/base. ``names``: how to
    call the arguments in messages (e.g. ``{"height": "--height"}``)."""
    n = {"height": "height", "width": "width", "aspect": "aspect", "base": "base", "image": "image", **(names or {})}
    if aspect is not None:
        if height is not None or width is not None:
            raise ValueError(f"{n['aspect']} {aspect!r} together with {n['height']}/{n['width']} {height}/{width}: "
                             f"expected one of the two; fix: drop {n['aspect']} or {n['height']} and {n['width']}")
        if base is not None and (isinstance(base, bool) or not isinstance(base, int) or base not in (1024, 1440)):
            raise ValueError(f"{n['base']}: expected 1024 or 1440, found {base!r}")
        buckets = aspect_buckets(1440 if base is None else base)
        if aspect not in buckets:
            raise ValueError(f"{n['aspect']}: expected one of {list(buckets)} (W:H), found {aspect!r}")
        return buckets[aspect]
    if base is not None:
        raise ValueError(f"{n['base']} {base!r} without {n['aspect']}: the base resolution picks an aspect bucket; "
                         f"fix: add {n['aspect']} (e.g. 1:1) or pass {n['height']} and {n['width']} instead")
    if (height is None) != (width is None):
        given, missing = ("height", "width") if width is None else ("width", "height")
        raise ValueError(f"{n[given]} {height if width is None else width} without {n[missing]}: expected both (or "
                         f"{n['aspect']}); fix: pass {n[missing]} too")
    if height is None and image is not None:
        w, h = image.size if not isinstance(image, torch.Tensor) else (image.shape[-1], image.shape[-2])
        if h < 16 or w < 16:
            raise ValueError(f"{n['image']}: {w}×{h} pixels, expected at least 16×16 (the size comes from the image "
                             f"when no {n['height']}/{n['width']}/{n['aspect']} is given)")
        return h // 16 * 16, w // 16 * 16
    if height is None:
        return 1024, 1024
    return height, width


def check_request(prompt, negative_prompt="", *, height=None, width=None, aspect=None, base=None, steps=None,
                  cfg=None, seed=0, num_images=1, latents=None, image=None, denoise=None, mask=None,
                  template_date=DEFAULT_TEMPLATE_DATE, batch_index=0, schedule="official",
                  names: dict | None = None) -> dict:
    """Validate a generation request without any model (the pipeline calls it first; the CLI before loading).

    Returns the normalised request: ``prompts`` / ``negatives`` (lists), ``height``, ``width``, ``grid``,
    ``steps`` / ``cfg`` (None = the variant's default), ``seed``, ``num_images``, ``batch`` (prompts ×
    num_images), ``batch_index``, ``latents`` (packed, checked), ``image`` (an RGB PIL image or a checked tensor,
    None without one), ``mask`` (a float tensor in [0, 1] or None), ``denoise``, ``template_date``, ``schedule``
    (the canonical spec, e.g. ``"official"`` or ``"simple:1.829"``). Raises
    ValueError / OSError naming the argument, the expected and the found value, and the fix (``names``: how to
    call each argument, e.g. the CLI's flags).
    """
    n = {k: k for k in ("prompt", "negative_prompt", "height", "width", "aspect", "base", "steps", "cfg", "seed",
                        "num_images", "latents", "image", "denoise", "batch_index", "mask", "schedule")}
    n.update(names or {})
    prompts = [check_text(prompt, n["prompt"])] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"{n['prompt']}: expected a string or a non-empty list of strings, found {prompt!r:.80}")
    prompts = [check_text(p, f"prompt[{i}]") for i, p in enumerate(prompts)]
    if negative_prompt is None:         # documented: None = no negative prompt (the official empty one)
        negative_prompt = ""
    if isinstance(negative_prompt, str):
        negatives = [check_text(negative_prompt, n["negative_prompt"])] * len(prompts)
    else:
        negatives = [check_text(n, f"negative_prompt[{i}]") for i, n in enumerate(negative_prompt)]
        if len(negatives) == 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise ValueError(f"negative_prompt: expected a string or {len(prompts)} entries (one per prompt), "
                             f"got {len(negatives)}")
    num_images = cf.check_batch(num_images, n["num_images"])
    batch = cf.check_int(len(prompts) * num_images, "prompts × num_images", 1, cf.MAX_BATCH,
                         f"at most {cf.MAX_BATCH} images per call")
    batch_index = cf.check_int(batch_index, n["batch_index"], 0, cf.MAX_BATCH - batch,
                               f"the index of the first image within a batch of at most {cf.MAX_BATCH}")
    seed = cf.check_seed(seed, n["seed"])
    steps = None if steps is None else cf.check_steps(steps, n["steps"])
    schedule = format_schedule(*parse_schedule(schedule, n["schedule"]))
    cfg = None if cfg is None else cf.check_number(cfg, n["cfg"], 0.0, 100.0, "Lens uses 5, Turbo 1")
    template_date = resolve_date(template_date)
    if image is not None and isinstance(image, (str, os.PathLike)):
        image = to_rgb(open_image(image, n["image"]), f"{n['image']} {os.fspath(image)}")
    elif image is not None and isinstance(image, torch.Tensor):
        if image.ndim == 3:
            image = image[None]
        if image.ndim != 4 or image.shape[1] != 3 or image.shape[0] not in (1, batch):
            raise ValueError(f"image: expected a [1 or {batch}, 3, H, W] tensor in [-1, 1], found shape "
                             f"{tuple(image.shape)}")
        cf.check_pixels(image.shape[2], image.shape[3], "image", cf.MAX_INIT_IMAGE_PIXELS)
        cf.check_finite_tensor(image, "image")
        image = check_image_range(image.float(), "image (a tensor init image)", -1.0, 1.0,
                                  "scale it to [-1, 1] (x / 127.5 - 1 for 0 … 255, 2x - 1 for 0 … 1), or pass a "
                                  "PIL image")
    elif image is not None:
        from PIL import Image

        if not isinstance(image, Image.Image):
            raise ValueError(f"image: expected a path, a PIL image or a [B, 3, H, W] tensor in [-1, 1], found "
                             f"{type(image).__name__}")
        cf.check_pixels(image.size[1], image.size[0], "image", cf.MAX_INIT_IMAGE_PIXELS)
        image = to_rgb(image, "image")
    if mask is not None:
        if image is None:
            raise ValueError(f"{n['mask']}: inpainting needs the image to keep outside the mask; fix: pass "
                             f"{n['image']} as well, or drop {n['mask']} for text-to-image")
        mask = load_mask(mask, n["mask"])
    if denoise is None:
        denoise = DEFAULT_IMG2IMG_DENOISE if image is not None and mask is None else 1.0
    denoise = cf.check_number(denoise, n["denoise"], 0.0, 1.0, "img2img strength in (0, 1]; 1 = text-to-image")
    if denoise <= 0.0:
        raise ValueError(f"{n['denoise']}: expected a value in (0, 1], found 0.0; fix: a small positive value keeps most "
                         "of the image (e.g. 0.3)")
    if denoise < 1.0 and image is None:
        raise ValueError(f"{n['denoise']} {denoise} without {n['image']}: denoise < 1 is img2img and needs an init image; "
                         f"fix: pass {n['image']}, or {n['denoise']} 1.0 for text-to-image")
    height, width = resolve_size(height, width, aspect, base, image, n)
    grid = cf.check_generation_size(height, width, f"size ({n['width']}×{n['height']})",
                                   names=(n["height"], n["width"]))
    if isinstance(image, torch.Tensor) and tuple(image.shape[2:]) != (height, width):
        raise ValueError(f"image: a tensor init image must have the generation size {height}×{width} (H×W), "
                         f"found {tuple(image.shape[2:])}; fix: resize it, or pass a PIL image (resized for you)")
    if latents is not None:
        if not isinstance(latents, torch.Tensor) or latents.ndim not in (3, 4):
            raise ValueError(f"latents: expected packed tokens [B, S_img, 128] or a [B, 128, h, w] latent, found "
                             f"{getattr(latents, 'shape', type(latents).__name__)}")
        shape = tuple(latents.shape)
        latents = pack_latents(latents) if latents.ndim == 4 else latents
        if tuple(latents.shape) != (batch, grid[0] * grid[1], 128):
            raise ValueError(f"latents: expected [{batch}, {grid[0] * grid[1]}, 128] for {height}×{width} and batch "
                             f"{batch}, got {shape}")
        cf.check_finite_tensor(latents, "latents")
    return {"prompts": prompts, "negatives": negatives, "height": height, "width": width, "grid": grid,
            "steps": steps, "cfg": cfg, "seed": seed, "num_images": num_images, "batch": batch,
            "batch_index": batch_index, "latents": latents, "image": image, "mask": mask, "denoise": denoise,
            "template_date": template_date, "schedule": schedule}


def resolve_paths(path=None, *, transformer=None, text_encoder=None, vae=None, tokenizer=None,
                  names: dict | None = None) -> dict:
    """Component paths {transformer, text_encoder, vae, tokenizer}, checked without opening any weight file.

    ``path``: a diffusers Lens folder, a DiT file/folder, or a dict ``{component: path}``; keyword paths
    override. Checks: every path exists; a diffusers folder has the subfolders it must provide; a DiT alone
    comes with a text encoder and a VAE; a folder holds .safetensors weights; no pickle (all through
    :func:`lens_core.checkpoints.locate`); the tokenizer (given, or found for the text encoder) is a
    tokenizer.json, a folder with one, the side-car ``<stem>.tokenizer.json`` of an encoder file (or the
    tokenizer.json beside a GGUF encoder), or a .safetensors text-encoder file (embedded tokenizer, read first at
    load); ``paths["tokenizer"]`` is that tokenizer.json or encoder file. ``names``: how to call each argument in messages (the CLI passes
    its flags, e.g. ``{"path": "--model"}``).
    """
    label = {"path": "path", "transformer": "transformer", "text_encoder": "text_encoder", "vae": "vae",
             "tokenizer": "tokenizer", **(names or {})}
    paths, given = {}, {}
    if isinstance(path, dict):
        unknown = set(path) - set(COMPONENTS)
        if unknown:
            raise ValueError(f"from_pretrained: unknown component(s) {sorted(unknown)}; expected {COMPONENTS}")
        given = {c: (c, os.fspath(p)) for c, p in path.items()}
        path = None
    root = None
    if path is not None:
        path = os.fspath(path)
        _check_exists(path, label["path"])
        if ck.is_diffusers_root(path):
            root = path
        else:
            given["transformer"] = ("path", path)
    for name, value in (("transformer", transformer), ("text_encoder", text_encoder), ("vae", vae),
                        ("tokenizer", tokenizer)):
        if value is not None:
            given[name] = (name, os.fspath(value))
    for name, (arg, p) in given.items():
        if name != "tokenizer":
            ck.locate(p, name, label[arg])              # exists, no pickle, finds the weights (nothing read)
        paths[name] = p
    if root is not None:
        for c in COMPONENTS:
            if c not in paths:
                sub = os.path.join(root, c)
                if c != "tokenizer" and not os.path.isdir(sub):
                    raise ck.CheckpointError(
                        f"{label['path']} {root}: a diffusers Lens folder without its '{c}/' subfolder (found "
                        f"{sorted(os.listdir(root))}); fix: complete the download, or pass the {label[c]} path")
                paths[c] = root
    missing = [c for c in ("transformer", "text_encoder", "vae") if c not in paths]
    if missing:
        what = (f"{label['path']} {path} is a single model, not a diffusers Lens folder (no model_index.json)"
                if path is not None else "no diffusers Lens folder given")
        raise ValueError(f"{what}: expected paths for the transformer, text encoder and VAE too; missing "
                         f"{', '.join(label[c] for c in missing)}; fix: pass "
                         f"{' and '.join(label[c] for c in missing)} (or a whole diffusers Lens folder)")
    # the tokenizer: given, or found for the text encoder / diffusers root (side-car, embedded, tokenizer/ …)
    tok_label = (label["tokenizer"] if "tokenizer" in given else
                 f"{label['tokenizer']} (found beside {paths['text_encoder']})")
    paths["tokenizer"] = ck.locate(paths.get("tokenizer", paths["text_encoder"]), "tokenizer", tok_label).path
    return paths


def check_headers(paths: dict) -> None:
    """Read only the safetensors headers of the transformer, text encoder and VAE and check that each is what
    its slot expects (a VAE given as the model, a text encoder as the VAE … fail here, before any weight is
    read, with the loader's own message)."""
    for component in ("transformer", "text_encoder", "vae"):
        source = ck.open_source(paths[component], component)
        try:
            det = ck.detect(source.keys())
            if det.component != component:
                raise ck.CheckpointError(f"{source.origin}: expected a {ck.COMPONENT_NAMES[component]} checkpoint, "
                                         f"but this looks like {det.description}")
        finally:
            source.close()


def _check_exists(p: str, label: str):
    if not os.path.exists(p):
        parent = os.path.dirname(os.path.abspath(p))
        hint = (f"{parent} holds {sorted(os.listdir(parent))[:12]}" if os.path.isdir(parent) else
                f"its folder {parent} does not exist either")
        raise missing_path(p, label, f"check the path ({hint})")


def load_mask(mask, label: str = "mask") -> torch.Tensor:
    """An inpainting mask as a float32 tensor in [0, 1] (1 = regenerate): from a path or PIL image (brightness, or
    1 − alpha for a mask with transparency as ComfyUI's LoadImage reads it: :func:`lens_core.images.mask_values`)
    or a tensor."""
    if isinstance(mask, torch.Tensor):
        return mask
    from PIL import Image
    import numpy as np

    name = label
    if isinstance(mask, (str, os.PathLike)):
        name = f"{label} {os.fspath(mask)}"
        mask = open_image(mask, label)       # exists, is an image, bounded size: header only so far
        try:
            mask.load()
        except OSError as exc:
            raise OSError(f"{name}: the image data cannot be decoded ({exc}); fix: re-save the mask") from None
    if not isinstance(mask, Image.Image):
        raise ValueError(f"{name}: expected a PIL image, a path or a tensor [H, W] in [0, 1], got "
                         f"{type(mask).__name__}")
    t = torch.from_numpy(np.ascontiguousarray(mask_values(mask, name)))
    if not bool(torch.isfinite(t).all()) or float(t.min()) < 0 or float(t.max()) > 1:
        raise ValueError(f"{name}: a float ('F' mode) mask must hold values in [0, 1], found "
                         f"[{float(t.nan_to_num().min()):g}, {float(t.nan_to_num().max()):g}] or NaN")
    return t


def paste_kept_pixels(generated, image, mask):
    """Inpainting paste-back: the output pixel is ``m·generated + (1 − m)·image`` with the mask ``m`` (1 = regenerate)
    resized bilinearly to the output size, so the kept (black) pixels are exactly the init image's — the VAE
    round trip would otherwise change them slightly — and soft mask edges blend. ``image``: the RGB PIL init
    image (resized like the init latents, LANCZOS) or a [1, 3, H, W] tensor in [−1, 1] of the output size;
    ``mask``: a [H, W] (or [1, H, W]) tensor in [0, 1] at any size. Returns a new RGB PIL image.

    The CLI does this by default (``--no-paste-back`` turns it off); ComfyUI users composite with the core
    ``ImageCompositeMasked`` node, as for any inpainting model."""
    import numpy as np
    from PIL import Image

    w, h = generated.size
    if isinstance(image, torch.Tensor):
        init = ((image[0].float().clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).cpu().numpy()
    else:
        init = np.asarray((image if image.size == (w, h) else image.resize((w, h), Image.LANCZOS)).convert("RGB"),
                          dtype=np.float32)
    m = mask.float()
    while m.ndim > 2:
        m = m[0]
    m = Image.fromarray(m.cpu().numpy().astype(np.float32), mode="F")
    m = np.asarray(m if m.size == (w, h) else m.resize((w, h), Image.BILINEAR), dtype=np.float32).clip(0, 1)[..., None]
    gen = np.asarray(generated.convert("RGB"), dtype=np.float32)
    out = gen * m + init * (1.0 - m)
    return Image.fromarray(np.rint(out).clip(0, 255).astype(np.uint8), mode="RGB")

