"""Command line: ``python -m lens_core generate ...`` and ``python -m lens_core inspect PATH``.

generate: loads a diffusers Lens folder (or a DiT file plus ``--text-encoder`` and ``--vae``), shows a tqdm bar
per stage (load, denoise, decode) and writes PNGs whose text chunks hold the parameters (``parameters``: a
one-line summary in the common "Steps: …, CFG scale: …" style; ``lens``: the full JSON).

inspect: prints what a file or folder is (family, component, variant, dtypes, tensor count, size) without
loading any weights — the first thing to run when a loader complains.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

VARIANT_NAMES = {"lens": "Lens", "turbo": "Lens-Turbo", "base": "Lens-Base"}
DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lens_core", description="Microsoft Lens text-to-image, no ComfyUI")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate image(s) from a prompt")
    g.add_argument("--model", required=True, help="diffusers Lens folder, or a DiT file/folder")
    g.add_argument("--text-encoder", help="text encoder (MXFP4 folder or gpt_oss_20b_nvfp4.safetensors)")
    g.add_argument("--vae", help="VAE (vae/ folder or flux2-vae.safetensors)")
    g.add_argument("--tokenizer", help="tokenizer folder or tokenizer.json (default: found beside the models)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative", default="", help='negative prompt (default "": the official empty negative)')
    g.add_argument("--aspect", help="aspect bucket W:H, e.g. 1:1, 16:9, 2:3 (with --base)")
    g.add_argument("--base", type=int, default=None, help="bucket base resolution 1024 or 1440 (default 1440)")
    g.add_argument("--height", type=int)
    g.add_argument("--width", type=int)
    g.add_argument("--steps", type=int, help="default: the variant's (Lens 20, Turbo 4, Base 50)")
    g.add_argument("--cfg", type=float, help="default: the variant's (Lens 5, Turbo 1, Base 5)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--image", help="init image for img2img (use with --denoise < 1)")
    g.add_argument("--denoise", type=float, default=1.0)
    g.add_argument("--mask", help="inpainting mask image for --image: white = regenerate, black = keep "
                                  "(masked denoising; works with any --denoise)")
    g.add_argument("--variant", choices=["lens", "turbo", "base"], help="override the detected variant")
    g.add_argument("--date", default=None, help="chat-template date (default 2026-05-23; 'today' = official)")
    g.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--offload", action=argparse.BooleanOptionalAction, default=None,
                   help="sequential offload (default: on for cuda)")
    g.add_argument("--fp8", action="store_true", help="store the DiT block Linears as fp8 e4m3fn")
    g.add_argument("--out", required=True, help="output PNG (several images: out_0.png, out_1.png, ...)")

    i = sub.add_parser("inspect", help="describe a checkpoint file or folder")
    i.add_argument("path")
    i.add_argument("--json", action="store_true", help="print JSON")
    return p


def _png_info(params: dict):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    summary = (f"{params['prompt']}\nNegative prompt: {params['negative_prompt']}\n"
               f"Steps: {params['steps']}, CFG scale: {params['cfg']}, Seed: {params['seed']}, "
               f"Size: {params['width']}x{params['height']}, Model: {VARIANT_NAMES.get(params['variant'], params['variant'])}, "
               f"Denoise: {params['denoise']}, Dtype: {params['dtype']}, Template date: {params['template_date']}")
    info.add_text("parameters", summary)
    info.add_text("lens", json.dumps(params))
    return info


def out_paths(out: str, n: int) -> list[str]:
    if n == 1:
        return [out]
    stem, ext = os.path.splitext(out)
    return [f"{stem}_{k}{ext or '.png'}" for k in range(n)]


def cmd_generate(args) -> int:
    import torch

    from .pipeline import LensPipeline

    if args.mask is not None:       # checked before any weight is loaded
        if args.image is None:
            raise ValueError("--mask: inpainting needs --image (the picture to keep outside the mask)")
        if not os.path.isfile(args.mask):
            raise FileNotFoundError(f"--mask: no such file {args.mask!r}; expected a mask image (white = regenerate)")
    pipe = LensPipeline.from_pretrained(args.model, text_encoder=args.text_encoder, vae=args.vae,
                                        tokenizer=args.tokenizer, dtype=getattr(torch, DTYPES[args.dtype]),
                                        device=args.device, offload=args.offload, variant=args.variant,
                                        fp8=args.fp8, progress=True)
    out = pipe(args.prompt, negative_prompt=args.negative, height=args.height, width=args.width,
               aspect=args.aspect or (None if args.height or args.width or args.image else "1:1"), base=args.base,
               steps=args.steps, cfg=args.cfg, seed=args.seed, num_images=args.num_images, image=args.image,
               denoise=args.denoise, mask=args.mask, template_date=args.date)
    params = dict(out.parameters, model=os.path.abspath(args.model), init_image=args.image, mask=args.mask)
    for path, img in zip(out_paths(args.out, len(out.images)), out.images):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        img.save(path, pnginfo=_png_info(params))
        print(path)
    return 0


def cmd_inspect(args) -> int:
    from .checkpoints import format_inspect, inspect

    info = inspect(args.path)
    print(json.dumps(info, indent=2) if args.json else format_inspect(info))
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .checkpoints import CheckpointError

    try:
        return cmd_generate(args) if args.command == "generate" else cmd_inspect(args)
    except (CheckpointError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
