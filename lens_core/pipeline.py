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
from .config import aspect_buckets, pack_latents, unpack_latents, validate_size, variant_defaults, variant_name
from .prompt import DEFAULT_TEMPLATE_DATE, encode_prompts, resolve_date
from .sampling import make_noise, prepare_mask, sample

COMPONENTS = ("transformer", "text_encoder", "vae", "tokenizer")


def resolve_device(device=None) -> torch.device:
    """``"auto"``/None → cuda when available, else cpu."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclasses.dataclass
class LensOutput:
    images: list                 # PIL images, one per sample
    latents: torch.Tensor        # final packed latents [B, S_img, 128] (run dtype, BN-normalised space)
    uint8: torch.Tensor          # [B, H, W, 3] uint8 (the PIL pixels)
    parameters: dict             # everything needed to reproduce the call


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
                 device="cpu", offload=False, exact=True):
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.vae = vae
        self.variant = variant_name(variant)
        self.dtype = dtype
        self.device = resolve_device(device)
        self.offload = bool(offload)
        self.exact = exact
        if self.vae is not None and hasattr(self.vae, "exact"):
            self.vae.exact = exact        # reference mode decodes like the official VAE too (bf16 bit-exact)
        self.progress = False
        if not self.offload:
            for m in (transformer, text_encoder, vae):
                m.to(self.device)

    # ---- loading -----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path=None, *, transformer=None, text_encoder=None, vae=None, tokenizer=None,
                        dtype=torch.bfloat16, device="auto", offload=None, variant=None, fp8=False,
                        configs: dict | None = None, exact=True, progress=False) -> "LensPipeline":
        """Load every component.

        ``path``: a diffusers Lens folder (all components), a DiT file/folder (then ``text_encoder`` and ``vae``
        are required), or a dict ``{component: path}``. Keyword paths override single components.
        ``dtype``: run dtype of all three models (the official pipeline uses one ``torch_dtype``).
        ``device``: "cpu", "cuda", "auto". ``offload``: sequential offload (default: True on CUDA).
        ``variant``: "lens" / "turbo" / "base" (default: detected from config/metadata/path).
        ``fp8``: store the DiT's block Linears as fp8 e4m3fn. ``configs``: per-component config overrides
        (``{"transformer": {...}, "text_encoder": {...}, "vae": {...}}``, for files without config.json).
        """
        paths = dict(path) if isinstance(path, dict) else {}
        unknown = set(paths) - set(COMPONENTS)
        if unknown:
            raise ValueError(f"from_pretrained: unknown component(s) {sorted(unknown)}; expected {COMPONENTS}")
        root = None
        if path is not None and not isinstance(path, dict):
            path = os.fspath(path)
            if ck.is_diffusers_root(path):
                root = path
                paths = {c: path for c in COMPONENTS}
            else:
                paths["transformer"] = path
        for name, value in (("transformer", transformer), ("text_encoder", text_encoder), ("vae", vae),
                            ("tokenizer", tokenizer)):
            if value is not None:
                paths[name] = os.fspath(value)
        missing = [c for c in ("transformer", "text_encoder", "vae") if c not in paths]
        if missing:
            raise ValueError(f"from_pretrained: expected a diffusers Lens folder or paths for transformer, "
                             f"text_encoder and vae; missing {missing} (got {paths or path!r})")
        if "tokenizer" not in paths:
            paths["tokenizer"] = _tokenizer_path(paths["text_encoder"], root)
        device = resolve_device(device)
        if offload is None:
            offload = device.type == "cuda"
        load_device = "cpu" if offload else device
        configs = configs or {}
        bar = _progress(progress, 4, "load")
        if bar is not None:
            bar.set_postfix_str("transformer")

        def step(done, following):
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(following)

        dit = ck.load_transformer(paths["transformer"], dtype=dtype, device=load_device, variant=variant, fp8=fp8,
                                  config=configs.get("transformer"))
        step("transformer", "text_encoder")
        selected = dit.lens_checkpoint.config["selected_layer_index"]
        te = ck.load_text_encoder(paths["text_encoder"], dtype=dtype, device=load_device,
                                  config=configs.get("text_encoder"), selected_layers=selected)
        step("text_encoder", "vae")
        v = ck.load_vae(paths["vae"], dtype=dtype, device=load_device, config=configs.get("vae"))
        step("vae", "tokenizer")
        tok = ck.load_tokenizer(paths["tokenizer"])
        step("tokenizer", "done")
        if bar is not None:
            bar.close()
        pipe = cls(dit, te, tok, v, variant=dit.lens_checkpoint.variant, dtype=dtype, device=device,
                   offload=offload, exact=exact)
        pipe.paths = paths
        pipe.progress = progress
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
        """(height, width): an aspect bucket if ``aspect`` is given (base default 1440), else height/width,
        else the init image's size (rounded down to 16), else 1024×1024 (the official default)."""
        if aspect is not None:
            buckets = aspect_buckets(base or 1440)
            if aspect not in buckets:
                raise ValueError(f"aspect {aspect!r}: expected one of {list(buckets)}")
            return buckets[aspect]
        if height is None and width is None and image is not None:
            w, h = image.size
            return h // 16 * 16, w // 16 * 16
        if height is None or width is None:
            return 1024, 1024
        return int(height), int(width)

    def encode(self, prompts, negative_prompt, num_images, template_date):
        """Positive and negative (``None`` = the official empty negative) features and masks per sample."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if isinstance(negative_prompt, str):
            negs = [negative_prompt] * len(prompts)
        else:
            negs = list(negative_prompt)
            if len(negs) == 1:
                negs = negs * len(prompts)
            if len(negs) != len(prompts):
                raise ValueError(f"negative_prompt: expected a string or {len(prompts)} entries (one per prompt), "
                                 f"got {len(negs)}")
        with self._on_device(self.text_encoder) as te:
            feats, mask = encode_prompts(te, self.tokenizer, prompts, date=template_date, device=self.device)
            neg = None
            if any(n.strip() for n in negs):
                neg = encode_prompts(te, self.tokenizer, negs, date=template_date, device=self.device)

        def rep(t):
            return t.repeat_interleave(num_images, dim=0)
        feats, mask = [rep(f) for f in feats], rep(mask)
        if neg is not None:
            neg = ([rep(f) for f in neg[0]], rep(neg[1]))
        return feats, mask, neg

    def _init_latents(self, image, height, width, batch):
        from PIL import Image

        if isinstance(image, (str, os.PathLike)):
            image = Image.open(image)
        if isinstance(image, Image.Image):
            image = image.convert("RGB")
            if image.size != (width, height):
                image = image.resize((width, height), Image.LANCZOS)
            import numpy as np

            x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        elif isinstance(image, torch.Tensor):
            x = image if image.ndim == 4 else image[None]
        else:
            raise ValueError(f"image: expected a PIL image, a path or a [B, 3, H, W] tensor in [-1, 1], got "
                             f"{type(image).__name__}")
        with self._on_device(self.vae) as vae:
            z = vae.encode(x.to(self.device))
        z = pack_latents(z)
        if z.shape[0] == 1 and batch > 1:
            z = z.expand(batch, -1, -1)
        return z

    # ---- generation --------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt, negative_prompt="", height=None, width=None, aspect=None, base=None, steps=None,
                 cfg=None, seed=0, num_images=1, latents=None, image=None, denoise=1.0, mask=None,
                 template_date=DEFAULT_TEMPLATE_DATE, callback=None) -> LensOutput:
        """Generate images. ``steps``/``cfg`` default to the variant's (lens 20/5, turbo 4/1, base 50/5).

        ``latents``: initial noise as packed tokens [B, S_img, 128] (or a [B, 128, h, w] latent), used as given
        (the official ``latents=``); otherwise seeded noise (``make_noise(seed, ...)``, one draw for the batch).
        ``image`` + ``denoise`` < 1: img2img from the encoded image. ``callback(step, total, latents, x0)``.
        ``mask`` (with ``image``): inpainting by masked denoising, 1 (white) = generate anew, 0 (black) = keep
        the image; a PIL image, a path, or a tensor [H, W] / [B, H, W] in [0, 1] at any resolution (resized
        to the latent grid like ComfyUI does). Works at any ``denoise`` (1 = the masked area from pure noise).
        """
        from PIL import Image
        from .vae import to_uint8

        region = mask                    # the inpainting mask; ``mask`` below is the text mask
        if region is not None and image is None:
            raise ValueError("mask: inpainting needs the image to keep outside the mask; pass image= as well "
                             "(or drop mask= for text-to-image)")
        template_date = resolve_date(template_date)
        d_steps, d_cfg = variant_defaults(self.variant)
        steps = d_steps if steps is None else int(steps)
        cfg = d_cfg if cfg is None else float(cfg)
        img_for_size = Image.open(image) if isinstance(image, (str, os.PathLike)) else image
        height, width = self.resolve_size(height, width, aspect, base,
                                          img_for_size if isinstance(img_for_size, Image.Image) else None)
        gh, gw = validate_size(height, width)
        n_prompts = 1 if isinstance(prompt, str) else len(prompt)
        batch = n_prompts * int(num_images)

        feats, mask, neg = self.encode(prompt, negative_prompt, int(num_images), template_date)
        if latents is not None:
            noise = pack_latents(latents) if latents.ndim == 4 else latents
            if tuple(noise.shape) != (batch, gh * gw, 128):
                raise ValueError(f"latents: expected [{batch}, {gh * gw}, 128] for {height}×{width} and batch "
                                 f"{batch}, got {tuple(latents.shape)}")
        else:
            noise = make_noise(seed, batch, gh, gw)
        init = packed_mask = None
        if region is not None:
            packed_mask = prepare_mask(load_mask(region), batch, gh, gw)
        if image is not None and (denoise < 1.0 or region is not None):
            init = self._init_latents(image, height, width, batch)

        bar = _progress(self.progress, steps, "denoise")

        def on_step(step, total, lat, x0):
            if bar is not None:
                bar.total = total
                bar.update(1)
            if callback is not None:
                return callback(step, total, lat, x0)
            return None

        with self._on_device(self.transformer) as dit:
            final = sample(dit, noise, feats, mask, None if neg is None else neg[0], None if neg is None else neg[1],
                           grid=(gh, gw), steps=steps, cfg=cfg, denoise=denoise, init_latents=init,
                           callback=on_step, exact=self.exact, dtype=self.dtype, device=self.device,
                           mask=packed_mask)
        if bar is not None:
            bar.close()
        dbar = _progress(self.progress, 1, "decode")
        with self._on_device(self.vae) as vae:
            decoded = vae.decode(unpack_latents(final, gh, gw))
            pixels = to_uint8(decoded).cpu()
        if dbar is not None:
            dbar.update(1)
            dbar.close()
        images = [Image.fromarray(p.numpy()) for p in pixels]
        params = {"prompt": prompt, "negative_prompt": negative_prompt, "height": height, "width": width,
                  "steps": steps, "cfg": cfg, "seed": None if latents is not None else seed,
                  "num_images": int(num_images), "denoise": denoise, "inpaint": region is not None, "template_date": template_date,
                  "variant": self.variant, "dtype": str(self.dtype).replace("torch.", ""), "exact": self.exact}
        return LensOutput(images=images, latents=final, uint8=pixels, parameters=params)


def load_mask(mask) -> torch.Tensor:
    """An inpainting mask as a float32 tensor in [0, 1] (1 = regenerate): from a path or PIL image (8-bit or
    16-bit grayscale, palette, RGB(A): its luminance; a float image must already be in [0, 1]) or a tensor."""
    if isinstance(mask, torch.Tensor):
        return mask
    from PIL import Image, UnidentifiedImageError
    import numpy as np

    name = "mask"
    if isinstance(mask, (str, os.PathLike)):
        name = f"mask {os.fspath(mask)!r}"
        try:
            mask = Image.open(mask)
            mask.load()
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise ValueError(f"{name}: expected an image file (PNG, JPEG, WebP …) whose white pixels mark the area "
                             f"to regenerate, could not read it: {exc}") from None
    if not isinstance(mask, Image.Image):
        raise ValueError(f"{name}: expected a PIL image, a path or a tensor [H, W] in [0, 1], got "
                         f"{type(mask).__name__}")
    if mask.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(mask, dtype=np.float32) / 65535.0
    elif mask.mode == "I":
        arr = np.asarray(mask, dtype=np.float64)
        arr = (arr / (65535.0 if arr.max(initial=0) > 255 else 255.0)).astype(np.float32)
    elif mask.mode == "F":
        arr = np.asarray(mask, dtype=np.float32)
    else:
        arr = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    t = torch.from_numpy(np.ascontiguousarray(arr))
    if not bool(torch.isfinite(t).all()) or float(t.min()) < 0 or float(t.max()) > 1:
        raise ValueError(f"{name}: a float ('F' mode) mask must hold values in [0, 1], found "
                         f"[{float(t.nan_to_num().min()):g}, {float(t.nan_to_num().max()):g}] or NaN")
    return t


def _tokenizer_path(text_encoder_path, root):
    """Where the tokenizer is when none is given: the diffusers root, the NVFP4 file's embedded tokenizer,
    or the ``tokenizer/`` folder beside a ``text_encoder/`` folder."""
    if root is not None:
        return root
    p = os.path.abspath(os.fspath(text_encoder_path))
    if os.path.isfile(p) and p.endswith(".safetensors"):
        return p
    folder = p if os.path.isdir(p) else os.path.dirname(p)
    if ck.is_diffusers_root(folder):
        return folder
    parent = os.path.dirname(folder)
    if os.path.isdir(os.path.join(parent, "tokenizer")):
        return parent
    return folder
