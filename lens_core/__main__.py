"""Command line: ``python -m lens_core generate ...`` and ``python -m lens_core inspect PATH`` (also installed as the
``lens`` command by ``pip install .``). Subcommands are registered in :data:`COMMANDS` (name → (add its
arguments, run it)).

generate: checks every argument first (:func:`validate_generate`: prompt text, sizes and limits, init image,
output paths, model paths and tokenizer, device), before any weight file is opened; then loads a diffusers Lens
folder (or a DiT file plus ``--text-encoder`` and ``--vae``), shows a tqdm bar per stage (load, denoise,
decode) and writes PNGs whose text chunks hold the parameters (``parameters``: a one-line summary in the common
"Steps: …, CFG scale: …" style; ``lens``: the full JSON, including ``command``, the command line that
regenerates that one image). ``--num-images N`` generates the images one after another, image k from rows k of
the seed's noise draw, so each PNG is reproduced alone by ``--seed S --batch-index k``.

Before loading, ``generate`` makes a memory plan (:mod:`lens_core.memory`: each model's resident size from its
headers, the machine's available memory, which models are held when); ``--dry-run`` prints it and stops,
``--memory`` overrides its choice, and a plan that cannot fit is an error naming what would.

inspect: prints what a file or folder is (family, component, variant, dtypes, tensor count, size) without
loading any weights — the first thing to run when a loader complains.

Every user error ends in one line ``error: …`` on stderr (exit status 2; 3 when PyTorch is missing), never
in a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import tempfile

from .memory import HEADROOM, MODES as MEMORY_MODES     # imports no torch (lens_core.lazy_torch)

VARIANT_NAMES = {"lens": "Lens", "turbo": "Lens-Turbo", "base": "Lens-Base"}
DTYPES = {"auto": "auto", "bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32"}
#: What to run when PyTorch is missing (one line; README "Set-up commands" says the same).
TORCH_FIX = ("without an NVIDIA GPU the CPU-only PyTorch (0.19 GB download): pip install torch --index-url "
             "https://download.pytorch.org/whl/cpu; with one: pip install -r requirements-cli.txt (PyTorch from PyPI: "
             "the CUDA build on Linux, about 5.5 GB installed; CUDA 12.8: --index-url .../whl/cu128)")
MAX_PROMPT_FILE_BYTES = 1 << 20
#: suffix of the temporary files of :func:`write_atomic` (a killed run may leave one; ``batch`` removes them)
TMP_SUFFIX = ".lens-tmp"
#: CLI flag of each pipeline argument, for messages.
FLAG_NAMES = {"path": "--model", "transformer": "--model", "text_encoder": "--text-encoder", "vae": "--vae",
              "tokenizer": "--tokenizer", "prompt": "--prompt", "negative_prompt": "--negative",
              "height": "--height", "width": "--width", "aspect": "--aspect", "base": "--base", "steps": "--steps",
              "cfg": "--cfg", "seed": "--seed", "num_images": "--num-images", "image": "--image",
              "denoise": "--denoise", "batch_index": "--batch-index", "mask": "--mask", "schedule": "--schedule"}


def _seed(text: str):
    """``--seed``: a non-negative integer or ``random``."""
    if text.strip().lower() == "random":
        return "random"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2^64 - 1] or 'random', found {text!r}") \
            from None


def add_generate_arguments(sub) -> argparse.ArgumentParser:
    g = sub.add_parser("generate", help="generate image(s) from a prompt")
    g.add_argument("--model", required=True, help="diffusers Lens folder, or a DiT file/folder")
    g.add_argument("--text-encoder", help="text encoder (MXFP4 folder or gpt_oss_20b_nvfp4.safetensors)")
    g.add_argument("--vae", help="VAE (vae/ folder or flux2-vae.safetensors)")
    g.add_argument("--tokenizer", help="tokenizer folder or tokenizer.json (default: found beside the models)")
    text = g.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt")
    text.add_argument("--prompt-file", help="read the prompt from a UTF-8 text file (a final newline is dropped)")
    g.add_argument("--negative", default="", help='negative prompt (default "": the official empty negative; '
                                                  'unused at CFG 1, Turbo\'s default)')
    g.add_argument("--aspect", help="aspect bucket W:H, e.g. 1:1, 16:9, 2:3 (with --base)")
    g.add_argument("--base", type=int, default=None, help="bucket base resolution 1024 or 1440 (default 1440)")
    g.add_argument("--height", type=int, help="image height (with --width; multiples of 16)")
    g.add_argument("--width", type=int, help="image width (with --height; multiples of 16)")
    g.add_argument("--steps", type=int, help="default: the variant's (Lens 20, Turbo 4, Base 50)")
    g.add_argument("--cfg", type=float, help="default: the variant's (Lens 5, Turbo 1)")
    g.add_argument("--schedule", default="official", metavar="NAME[:SHIFT]",
                   help="sigma schedule: official (default, the Lens pipeline's), simple (ComfyUI's native Lens "
                        "template: ModelSamplingFlux 1.15/0.5 + the simple scheduler) or simple:SHIFT (e.g. "
                        "simple:1.829, a native Lens model without ModelSamplingFlux)")
    g.add_argument("--seed", type=_seed, default=0,
                   help="noise seed, 0 … 2^64-1 (default 0, so the same command gives the same image), or 'random' "
                        "(a new seed each run, printed and stored in the PNG)")
    g.add_argument("--num-images", type=int, default=1,
                   help="images to generate, one after another (writes out_0.png, out_1.png, ...)")
    g.add_argument("--batch-index", type=int, default=0,
                   help="index of the first image within the seed's batch (regenerates image k of a batch alone)")
    g.add_argument("--image", help="init image for img2img (any PIL-readable file; default --denoise 0.6)")
    g.add_argument("--denoise", type=float, default=None,
                   help="img2img strength in (0, 1] (default 0.6 with --image alone, 1 with --mask or without "
                        "--image)")
    g.add_argument("--mask", help="inpainting mask image for --image: white = regenerate, black = keep "
                                  "(masked denoising; works with any --denoise); a mask with transparency is read "
                                  "as ComfyUI's LoadImage does: transparent = regenerate")
    g.add_argument("--paste-back", action=argparse.BooleanOptionalAction, default=True,
                   help="with --mask: the kept (black) pixels of the output are the init image's own, blended "
                        "by the mask (default on; --no-paste-back keeps the decoded pixels everywhere)")
    g.add_argument("--enhance", action="store_true",
                   help="rewrite the prompt first with the official Lens reasoner (GPT-OSS, needs the diffusers "
                        "text_encoder/ with lm_head); prints it and stores both prompts in the PNG")
    g.add_argument("--enhance-max-new-tokens", type=int, default=None,
                   help="token budget of the enhancer (default 4096, the official; fewer is faster, a cut-off "
                        "answer keeps the original prompt)")
    g.add_argument("--variant", choices=["lens", "turbo", "base"], help="override the detected variant")
    g.add_argument("--date", default=None, help="chat-template date (default 2026-05-23; 'today' = official)")
    g.add_argument("--dtype", default="auto", choices=sorted(DTYPES),
                   help="compute dtype (default auto: bf16 on CUDA with bf16 and on CPUs with AMX/AVX512-BF16, "
                        "else fp32; under fp32, bf16-stored weights stay bf16 and are upcast per layer)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--offload", action=argparse.BooleanOptionalAction, default=None,
                   help="sequential offload (default: on for cuda)")
    g.add_argument("--memory", default="auto", choices=["auto", *MEMORY_MODES],
                   help="which models are held when (default auto: the first plan that fits the available "
                        "memory): resident = all held; sequential = the text encoder is released after encoding; "
                        "minimal = one model at a time")
    g.add_argument("--dry-run", action="store_true",
                   help="check every argument, print the memory plan (per model resident GB, peak estimate, "
                        "what is released when) and stop without reading any weights")
    g.add_argument("--plan-json", action="store_true", help="with --dry-run: also print the plan as one JSON line")
    g.add_argument("--fp8", action="store_true", help="store the DiT block Linears as fp8 e4m3fn")
    g.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="LoRA/LoHa/LoKr file for the DiT, strength default 1.0 (repeatable: adapters stack)")
    g.add_argument("--out", required=True, help="output PNG (several images: out_0.png, out_1.png, ...); an "
                   "existing file is never replaced unless --overwrite")
    g.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return g


def add_batch_arguments(sub, generate) -> argparse.ArgumentParser:
    from .batch import add_batch_parser

    return add_batch_parser(sub, generate)


def add_inspect_arguments(sub) -> argparse.ArgumentParser:
    i = sub.add_parser("inspect", help="describe a checkpoint file or folder (LoRA files included)")
    i.add_argument("path")
    i.add_argument("--json", action="store_true", help="print JSON")
    return i


def build_parser(parser_class=argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The CLI; ``parser_class``: the ArgumentParser (sub)class used for every parser (``batch`` parses its job
    lines with one that raises instead of exiting)."""
    p = parser_class(prog="python -m lens_core", description="Microsoft Lens text-to-image, no ComfyUI")
    sub = p.add_subparsers(dest="command", required=True)
    made: dict = {}
    for name, (add, _) in COMMANDS.items():
        made[name] = add(sub, made)
    return p


def _png_info(params: dict):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    index = "" if params.get("batch_index") is None else f", Batch index: {params['batch_index']}"
    summary = (f"{params['prompt']}\nNegative prompt: {params['negative_prompt']}\n"
               f"Steps: {params['steps']}, CFG scale: {params['cfg']}, Seed: {params['seed']}{index}, "
               f"Size: {params['width']}x{params['height']}, Model: {VARIANT_NAMES.get(params['variant'], params['variant'])}, "
               f"Denoise: {params['denoise']}, Dtype: {params['dtype']}, Template date: {params['template_date']}")
    if params.get("schedule", "official") != "official":
        summary += f", Schedule: {params['schedule']}"
    if params.get("fp8"):
        summary += ", FP8: on"
    if params.get("inpaint"):
        summary += f", Paste back: {'on' if params.get('paste_back') else 'off'}"
    if params.get("loras"):
        summary += ", Lora: " + " ".join(f"{d['file']}:{d['strength']:g}" for d in params["loras"])
    if params.get("original_prompt") is not None:
        summary += f"\nOriginal prompt (enhanced by the Lens reasoner): {params['original_prompt']}"
    info.add_text("parameters", summary)
    info.add_text("lens", json.dumps(params))
    return info


def out_paths(out: str, n: int, first: int = 0) -> list[str]:
    """One path for one image; ``stem_k.png`` for image k of several."""
    if n == 1:
        return [out]
    stem, ext = os.path.splitext(out)
    return [f"{stem}_{k}{ext}" for k in range(first, first + n)]


def _enhance_options(args):
    if args.enhance_max_new_tokens is not None and not args.enhance:
        raise ValueError("--enhance-max-new-tokens: only used with --enhance; add --enhance or drop it")
    if not args.enhance:
        return False
    if args.enhance_max_new_tokens is None:
        return True
    if args.enhance_max_new_tokens < 1:
        raise ValueError(f"--enhance-max-new-tokens: expected a positive number of tokens, found "
                         f"{args.enhance_max_new_tokens}")
    return {"max_new_tokens": args.enhance_max_new_tokens}


def _read_prompt_file(path: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--prompt-file {path}: no such file; fix: pass a UTF-8 text file")
    size = os.path.getsize(path)
    if size > MAX_PROMPT_FILE_BYTES:
        raise ValueError(f"--prompt-file {path}: expected a prompt of at most {MAX_PROMPT_FILE_BYTES} bytes, found "
                         f"{size} bytes (prompts are cut at 512 tokens anyway); fix: pass the prompt text only")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"--prompt-file {path}: expected UTF-8 text, found the byte {raw[exc.start]:#04x} at offset "
                         f"{exc.start} that is not UTF-8; fix: save the file as UTF-8") from None
    return text[:-1] if text.endswith("\n") else text


def probe_folder(folder: str, what: str) -> None:
    """Create ``folder`` if missing and check that a file can be written there (a temporary file, removed)."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".lens-write-test-"):
            pass
    except OSError as exc:
        raise PermissionError(f"{what}: cannot write in {folder} ({exc.strerror or exc}); fix: choose a writable "
                              f"folder") from None


def check_outputs(paths: list[str], overwrite: bool = False) -> None:
    """Each output must be a .png path in a folder that exists (or can be created) and is writable; checked by
    creating (and removing) a temporary file there, before anything is loaded. An existing file is an error
    unless ``overwrite`` (``--overwrite``)."""
    for path in paths:
        if os.path.lexists(path) and not os.path.isdir(path) and not overwrite:
            raise FileExistsError(f"--out {path}: the file exists ({_describe_existing(path)}); it is never replaced "
                                  f"silently; fix: --overwrite to replace it, or choose another --out name")
        if os.path.splitext(path)[1].lower() != ".png":
            raise ValueError(f"--out {path}: expected a .png file name, found "
                             f"{os.path.splitext(path)[1] or 'no extension'}; fix: e.g. --out "
                             f"{os.path.splitext(path)[0]}.png (the parameters are stored as PNG text chunks)")
        if os.path.isdir(path):
            raise IsADirectoryError(f"--out {path}: is a folder; fix: name a file, e.g. {os.path.join(path, 'out.png')}")
        parent = os.path.dirname(os.path.abspath(path))
        probe = parent
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        if not os.path.isdir(probe):
            raise NotADirectoryError(f"--out {path}: {probe} is a file, not a folder; fix: choose an output path in a "
                                     f"folder")
        probe_folder(parent, f"--out {path}")
        if os.path.exists(path) and not os.access(path, os.W_OK):
            raise PermissionError(f"--out {path}: the existing file is not writable; fix: choose another name")


def _describe_existing(path: str) -> str:
    try:
        return f"{os.path.getsize(path)} bytes" if not os.path.islink(path) else f"a link to {os.readlink(path)}"
    except OSError:
        return "unreadable"


def validate_generate(args, check_out: bool = True) -> dict:
    """Every check that needs no weights, in one place, run before loading (the plan for :func:`run_generate`).

    Returns ``{"prompt", "paths", "request", "outputs", "device", "dtype", "dtype_reason", "denoise_note"}``.
    Raises ValueError / OSError whose message names the flag, the expected and found values and the fix.
    ``check_out=False``: the output paths are not probed (``batch`` checks its output folder once).
    """
    import torch

    from .config import MAX_BATCH, check_batch, check_int
    from .hardware import resolve_device
    from .pipeline import check_request, resolve_dtype, resolve_paths

    prompt = _read_prompt_file(args.prompt_file) if args.prompt_file is not None else args.prompt
    names = dict(FLAG_NAMES, prompt="--prompt-file" if args.prompt_file is not None else "--prompt")
    seed = args.seed
    if seed == "random":
        import secrets

        seed = secrets.randbits(48)          # exact in JSON (< 2^53); printed and stored in the PNG
    n = check_batch(args.num_images, "--num-images")
    first = check_int(args.batch_index, "--batch-index", 0, MAX_BATCH - n,
                      f"--batch-index + --num-images at most {MAX_BATCH}")
    height, width, aspect, base = args.height, args.width, args.aspect, args.base
    if aspect is None and height is None and width is None and args.image is None:
        aspect = "1:1"                                      # the CLI default: 1:1 at --base (1440)
    # one image per pipeline call: the request is checked with num_images=1 at the last index used
    request = check_request(prompt, args.negative, height=height, width=width, aspect=aspect, base=base,
                            steps=args.steps, cfg=args.cfg, seed=seed, num_images=1, image=args.image,
                            denoise=args.denoise, mask=args.mask, template_date=args.date,
                            batch_index=first + n - 1, schedule=args.schedule, names=names)
    note = None
    if args.image is not None and args.denoise is None and args.mask is None:
        note = (f"note: --image without --denoise: img2img at --denoise {request['denoise']} (keeps the image's "
                f"layout and colours; lower keeps more, 1.0 uses the image only for its size)")
    outputs = out_paths(args.out, n, first)
    if check_out:
        check_outputs(outputs, getattr(args, "overwrite", False))
    paths = resolve_paths(args.model, text_encoder=args.text_encoder, vae=args.vae, tokenizer=args.tokenizer,
                          names=FLAG_NAMES)
    from . import lora as lo

    loras = [lo.parse_lora_arg(a) for a in args.lora]
    for path, _ in loras:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--lora: no such file {path!r}; expected a LoRA .safetensors file[:strength]")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device cuda: expected a CUDA device, found none; {cuda_missing_reason()}")
    device = resolve_device(args.device)
    dtype, reason = resolve_dtype(DTYPES[args.dtype], device)
    enhance = _enhance_options(args)
    if args.plan_json and not args.dry_run:
        raise ValueError("--plan-json: only used with --dry-run; add --dry-run or drop it")
    return {"prompt": prompt, "paths": paths, "request": request, "outputs": outputs, "first": first, "enhance": enhance,
            "device": device, "dtype": dtype, "dtype_reason": reason, "denoise_note": note,
            "loras": loras, "adapters": list(loras), "seed": seed, "random_seed": args.seed == "random"}


def check_models(args, plan: dict) -> None:
    """The checks that read headers (still no weights), after :func:`validate_generate`: each model file is what
    its slot expects, and every LoRA is read (small files) and matched against the DiT's layers (built on
    ``meta``), so a LoRA for another model or size fails now, not after minutes of loading.
    Sets ``plan["adapters"]`` to the loaded adapters."""
    from . import lora as lo
    from .pipeline import check_headers

    check_headers(plan["paths"])             # a misplaced file fails here, from its header alone
    adapters = []
    if plan["loras"]:
        from . import checkpoints as ck

        dit = ck.load_transformer(plan["paths"]["transformer"], dtype=plan["dtype"], variant=args.variant,
                                  meta=True)
        for path, strength in plan["loras"]:
            adapter = lo.load_lora(path)
            lo.resolve_targets(dit, adapter)
            adapters.append((adapter, lo.check_strength(strength, f"--lora {path}")))
    plan["adapters"] = adapters


def cuda_missing_reason() -> str:
    """Why ``--device cuda`` has no device, and the fix: a CPU-only PyTorch (install a CUDA build) or a CUDA
    build that sees no GPU (driver / CUDA_VISIBLE_DEVICES; installing PyTorch again would not help)."""
    import torch

    if torch.version.cuda is None:
        return (f"this PyTorch ({torch.__version__}) is a CPU-only build; fix: --device cpu, or install a CUDA build "
                f"(pip install torch --index-url https://download.pytorch.org/whl/cu128)")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    hint = f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU; " if visible is not None and not visible.strip(" ,-1") \
        else ""
    return (f"PyTorch {torch.__version__} is a CUDA {torch.version.cuda} build, but it sees no GPU; fix: {hint}check the "
            f"NVIDIA driver (nvidia-smi) and CUDA_VISIBLE_DEVICES, or use --device cpu")


def make_plan(args, plan: dict):
    """The memory plan for this request (:func:`lens_core.memory.plan_memory`, headers only)."""
    from .memory import plan_memory

    req = plan["request"]
    return plan_memory(plan["paths"], plan["dtype"], plan["device"], height=req["height"], width=req["width"],
                       cfg=req["cfg"], batch=1, fp8=args.fp8, variant=args.variant, memory=args.memory,
                       offload=args.offload)


def _command(args, plan, params: dict, out: str) -> str:
    """The command line that regenerates one image (every value explicit, so defaults do not matter; model and
    input paths absolute, so it runs from any folder), written to ``out``: the image's own output path as it was
    given (``batch``: the file name within its output folder)."""
    from .hardware import dtype_name

    cmd = ["python", "-m", "lens_core", "generate", "--model", os.path.abspath(args.model)]
    for flag, value in (("--text-encoder", args.text_encoder), ("--vae", args.vae), ("--tokenizer", args.tokenizer)):
        if value is not None:
            cmd += [flag, os.path.abspath(value)]
    cmd += ["--prompt", params["prompt"]]
    if params["negative_prompt"]:
        cmd += ["--negative", params["negative_prompt"]]
    cmd += ["--height", str(params["height"]), "--width", str(params["width"]), "--steps", str(params["steps"]),
            "--cfg", repr(params["cfg"]), "--seed", str(params["seed"]), "--batch-index", str(params["batch_index"])]
    if args.image is not None:
        cmd += ["--image", os.path.abspath(args.image), "--denoise", repr(params["denoise"])]
    if args.mask is not None:
        cmd += ["--mask", os.path.abspath(args.mask)]
        if not args.paste_back:
            cmd.append("--no-paste-back")
    if args.variant:
        cmd += ["--variant", args.variant]
    if params.get("schedule", "official") != "official":
        cmd += ["--schedule", params["schedule"]]
    cmd += ["--date", params["template_date"], "--dtype", dtype_name(plan["dtype"]), "--device", plan["device"].type]
    if args.fp8:
        cmd.append("--fp8")
    for path, strength in plan.get("loras", []):
        cmd += ["--lora", f"{os.path.abspath(path)}:{strength!r}"]
    cmd += ["--out", out]
    return shlex.join(cmd)


def run_generate(args, plan: dict, memory_plan=None) -> int:
    from .hardware import dtype_name
    from .pipeline import LensPipeline

    print(f"dtype: {dtype_name(plan['dtype'])} ({'--dtype ' + args.dtype if args.dtype != 'auto' else 'auto: ' + plan['dtype_reason']}), "
          f"device: {plan['device']}", file=sys.stderr)
    if memory_plan is not None:
        print(memory_plan.describe().splitlines()[0] + f", peak estimate {memory_plan.peak_bytes / 1e9:.1f} GB "
              f"(--dry-run shows the whole plan)", file=sys.stderr)
    if plan["denoise_note"]:
        print(plan["denoise_note"], file=sys.stderr)
    if plan["random_seed"]:
        print(f"seed: {plan['seed']} (random)", file=sys.stderr)
    paths = plan["paths"]
    pipe = LensPipeline.from_pretrained({c: paths[c] for c in ("transformer", "text_encoder", "vae", "tokenizer")},
                                        dtype=plan["dtype"], device=plan["device"], offload=args.offload,
                                        variant=args.variant, fp8=args.fp8, progress=True,
                                        loras=plan["adapters"], enhance=plan["enhance"],
                                        memory=args.memory if memory_plan is None else "auto", plan=memory_plan)
    req = plan["request"]
    cfg = req["cfg"] if req["cfg"] is not None else variant_cfg(pipe.variant)
    if cfg == 1.0 and plan["request"]["negatives"][0].strip():
        print(f"warning: --negative is not used at CFG 1 ({VARIANT_NAMES.get(pipe.variant, pipe.variant)}'s "
              f"default is CFG {variant_cfg(pipe.variant):g}: one forward per step, no negative pass); fix: "
              f"--cfg above 1 (e.g. 5, with more steps) to use it, or drop --negative", file=sys.stderr)
    for k, path in enumerate(plan["outputs"]):
        image, params = render_image(pipe, args, plan, k)
        if plan["enhance"]:
            print(f"enhanced prompt: {params['prompt']}")
        write_atomic(path, png_bytes(image, params), replace=getattr(args, "overwrite", False))
        print(path)
    return 0


def render_image(pipe, args, plan: dict, k: int = 0, out: str | None = None):
    """Image ``k`` of a validated plan on a loaded pipeline → (PIL image, the parameters stored in its PNG,
    including the ``command`` that regenerates it into ``out``, default the plan's k-th output). Inpainting
    pastes the kept pixels back unless ``--no-paste-back``. Shared by ``generate`` and ``batch``."""
    from .pipeline import paste_kept_pixels

    req = plan["request"]
    result = pipe(plan["prompt"], negative_prompt=args.negative, height=req["height"], width=req["width"],
                  steps=req["steps"], cfg=req["cfg"], seed=req["seed"], num_images=1,
                  batch_index=plan["first"] + k, image=req["image"], denoise=req["denoise"], mask=req["mask"],
                  template_date=req["template_date"], schedule=req["schedule"])
    paste = bool(args.mask is not None and getattr(args, "paste_back", True))
    params = dict(result.image_parameters[0], model=os.path.abspath(args.model),
                  init_image=None if args.image is None else os.path.abspath(args.image),
                  mask=None if args.mask is None else os.path.abspath(args.mask), device=plan["device"].type,
                  fp8=bool(args.fp8), paste_back=paste, memory=getattr(pipe, "memory", "resident"))
    image = result.images[0]
    if paste:
        image = paste_kept_pixels(image, req["image"], req["mask"])
    params["command"] = _command(args, plan, params, out if out is not None else plan["outputs"][k])
    return image, params


def png_bytes(image, params: dict) -> bytes:
    """The PNG file of an image with its parameters as text chunks (``parameters`` and ``lens``)."""
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=_png_info(params))
    return buf.getvalue()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: str, data: bytes, replace: bool = True) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename: a reader (or a run
    killed half-way) sees the old file or the whole new one, never a partial PNG. ``replace=False``: an existing
    ``path`` (also one made since the arguments were checked) is a FileExistsError and stays untouched."""
    folder, base = os.path.split(os.path.abspath(path))
    if not replace:     # claim the name exclusively first (fails if it exists), then rename onto our own file
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{base}.", suffix=TMP_SUFFIX)
    except BaseException:
        if not replace:
            with contextlib.suppress(OSError):
                os.unlink(path)           # our own empty placeholder
        raise
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())          # mkstemp makes 0600; a plain open() would give 0666 - umask
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if not replace:
            with contextlib.suppress(OSError):
                os.unlink(path)           # our own empty placeholder
        raise


def variant_cfg(variant) -> float:
    from .config import variant_defaults

    return float(variant_defaults(variant)[1])


def cmd_generate(args) -> int:
    plan = validate_generate(args)
    check_models(args, plan)
    memory_plan = make_plan(args, plan)
    if args.dry_run:
        for line in memory_plan.describe().splitlines():
            print(line)
    if not memory_plan.fits:
        print(f"warning: --memory {args.memory}: the peak estimate {memory_plan.peak_bytes / 1e9:.2f} GB exceeds the "
              f"plan budget {memory_plan.budget_bytes / 1e9:.2f} GB ({HEADROOM:.0%} of the memory available); it may "
              f"be killed for lack of memory", file=sys.stderr)
    if args.dry_run:
        if args.plan_json:
            print(json.dumps(memory_plan.to_dict()))
        return 0
    return run_generate(args, plan, memory_plan)


def cmd_inspect(args) -> int:
    from .checkpoints import format_inspect, inspect

    info = inspect(args.path)
    print(json.dumps(info, indent=2) if args.json else format_inspect(info))
    return 0


#: subcommand → (adds its parser to the subparsers, runs it: args → exit status). New subcommands register here:
#: ``add(subparsers, parsers made so far) -> parser``; ``run(args) -> exit status`` (imported lazily where heavy).
COMMANDS = {
    "generate": (lambda sub, made: add_generate_arguments(sub), lambda args: cmd_generate(args)),
    "batch": (lambda sub, made: add_batch_arguments(sub, made["generate"]), lambda args: run_batch(args)),
    "inspect": (lambda sub, made: add_inspect_arguments(sub), lambda args: cmd_inspect(args)),
    "quantize": (lambda sub, made: add_quantize_arguments(sub), lambda args: run_quantize(args)),
}


def add_quantize_arguments(sub) -> argparse.ArgumentParser:
    from .convert import add_parser     # torch-free at import (torch is imported by the command)

    return add_parser(sub)


def run_quantize(args) -> int:
    from .convert import run

    return run(args)


def run_batch(args) -> int:
    from .batch import run_batch as run

    return run(args)


def _import_torch():
    """Import PyTorch (the one dependency requirements.txt does not install), announced on a terminal: the first
    import takes seconds. Raises ImportError (name "torch") when it is missing."""
    if "torch" in sys.modules and sys.modules["torch"] is not None:
        return
    tty = sys.stderr.isatty()
    if tty:
        print("loading PyTorch …", end="", file=sys.stderr, flush=True)
    try:
        import torch  # noqa: F401
    finally:
        if tty:
            print("\r\033[K", end="", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _, run = COMMANDS[args.command]
    try:
        if args.command != "inspect":        # inspect reads headers only: it never needs PyTorch
            _import_torch()
        return run(args)
    except ImportError as exc:
        if exc.name == "torch" or "torch" in str(exc).split("'")[1:2]:
            print(f"error: PyTorch is not installed ({exc}); fix: {TORCH_FIX}", file=sys.stderr)
        else:
            fix = "" if "fix:" in str(exc) else "; fix: pip install -r requirements.txt"
            print(f"error: a required package is missing ({exc}){fix}", file=sys.stderr)
        return 3
    except (ValueError, OSError) as exc:      # CheckpointError is a ValueError; PIL's errors are OSErrors
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except MemoryError:
        print("error: out of memory; fix: a smaller size or --num-images, --dtype bf16 on hardware with bf16, "
              "--memory minimal (one model at a time), or --offload on a GPU", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
