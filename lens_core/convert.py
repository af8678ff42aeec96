"""``python -m lens_core quantize IN OUT --format F``: any Lens DiT the pack reads → a ComfyUI ``.comfy_quant`` file.

Input: whatever :func:`lens_core.checkpoints.locate` finds for the transformer — a diffusers folder (fp32 shards
+ index), the Comfy-Org ``lens_bf16`` / ``lens_turbo_bf16`` single files, a GGUF DiT with float (F16/BF16/F32)
tensors — with prefixes stripped. Already-quantized inputs (``.comfy_quant`` markers, fp8 weights, GGUF block
types) are refused: quantizing them again would add a second rounding to the first.

Output: one safetensors file in the layout ComfyUI 0.33 writes and its ``UNETLoader`` reads
(``comfy/ops.py`` ``_quantized_weight_state_dict``; QUANTIZATION.md): bare diffusers key names (like the Comfy-Org
files); per quantized Linear ``L``: ``L.weight`` in the format's storage dtype, its scales (``L.weight_scale`` …,
comfy-kitchen's ``state_dict_tensors`` names) and ``L.comfy_quant`` (the UTF-8 JSON marker as uint8); every other
tensor in bf16 (``--dtype fp32`` keeps fp32). The quantized tensors and markers come from the pack's format
registry :mod:`lens_core.quant_formats` (the one the loaders read with), i.e. comfy-kitchen's own
``QuantizedTensor.from_float`` with the layout ComfyUI maps the format to, so the file holds exactly what
ComfyUI would produce; E8M0 block scales are stored as U8 bytes, as in the Comfy-Org MXFP8 files.

Layer selection (what ComfyUI's quantized Lens files keep, checkpoint_formats.md §2.6): the block Linears
(``attn.img_qkv/txt_qkv/to_out.0/to_add_out``, ``img_mlp/txt_mlp.w1/w2/w3``) are quantized; the modulation
Linears (``img_mod``/``txt_mod``: quantizing them gives grid artifacts), norms, biases, the embedders
(``img_in``, ``txt_in``, ``time_text_embed``) and the final layer (``norm_out``, ``proj_out``) stay in bf16. A
layer whose shape the format cannot take without padding (e.g. a width no ConvRot group divides) stays bf16
and is listed in the summary.

Memory: the file is planned first (every output tensor's name, dtype and shape: the quantized ones from
comfy-kitchen's quantizer run on ``meta`` tensors, so nothing is guessed), its header written, and then each
source tensor is read, quantized and written at its planned offset (positioned writes), one at a time: peak
RSS ≈ the process + one layer in fp32 and its quantized copy (BENCHMARKS.md "Quantize"). The output is written
to a hidden temporary file beside OUT and renamed into place at the end (an interrupted run leaves no half
file); OUT is never replaced unless ``--overwrite``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

# torch and the loaders are imported inside the functions: ``python -m lens_core`` builds its argument parser
# (which lists the formats below) before it checks that PyTorch is installed.

ALIGN = 8                       # the data section starts at a multiple of this (safetensors' own writer: 8)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One converter format: the ``.comfy_quant`` format of :mod:`lens_core.quant_formats` it writes (the format
    registry: comfy-kitchen's quantizer, the marker ComfyUI reads) with its options, and what the layout needs of
    a layer's shape (``in_multiple``/``out_multiple``: no padding; ``convrot``: a power-of-4 rotation group must
    divide the input width)."""
    name: str
    comfy_format: str
    options: tuple = ()
    convrot: bool = False
    in_multiple: int = 1
    out_multiple: int = 1
    help: str = ""


RECIPES = {r.name: r for r in (
    Recipe("int8_convrot", "int8_tensorwise", (("convrot", True),), convrot=True,
           help="int8 weights, per-row scale, ConvRot (Hadamard) rotation; W8A8 in ComfyUI"),
    Recipe("int8", "int8_tensorwise", (("convrot", False),),
           help="int8 weights, per-row scale, no rotation; W8A8 in ComfyUI"),
    Recipe("convrot_w4a4", "convrot_w4a4", (("linear_dtype", "int4"),), convrot=True, in_multiple=64,
           help="int4 weights (group 64) with ConvRot rotation; W4A4 in ComfyUI"),
    Recipe("fp8_scaled", "float8_e4m3fn", help="float8 e4m3fn weights, one scale per tensor"),
    Recipe("fp8_e5m2_scaled", "float8_e5m2", help="float8 e5m2 weights, one scale per tensor"),
    Recipe("mxfp8", "mxfp8", in_multiple=32, out_multiple=32,
           help="float8 e4m3fn weights, E8M0 scale per 32 inputs (the Comfy-Org lens_mxfp8 format)"),
    Recipe("nvfp4", "nvfp4", in_multiple=16, out_multiple=16,
           help="fp4 e2m1 weights, e4m3 scale per 16 inputs + a global scale"),
)}
OUT_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


class ConvertError(ValueError):
    """A converter input/option that cannot give a valid output (the message names it and the fix)."""


def require_kitchen():
    """ImportError naming the install command where comfy-kitchen (the quantizers) is missing."""
    from . import quant_formats as qf
    if not qf.kitchen_available():
        raise ImportError(f"the quantize command needs comfy-kitchen, ComfyUI's quantization library, which is "
                          f"not installed in this Python; fix: {qf.KITCHEN_FIX}")


# ---------------------------------------------------------------------------------------------------------
# planning


@dataclasses.dataclass
class Planned:
    """One output tensor: name, torch dtype (the bytes written), shape, and the source tensor it comes from."""
    name: str
    dtype: object
    shape: tuple
    source: str
    start: int = 0

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def _convrot_group(width: int, wanted: int) -> int | None:
    """The ConvRot group for an input ``width``: ``wanted`` (a power of 4) if it divides the width, else the
    largest smaller power of 4 (at least 16) that does; None when none does."""
    g = wanted
    while g >= 16:
        if width % g == 0:
            return g
        g //= 4
    return None


def layer_options(recipe: Recipe, out_f: int, in_f: int, groupsize: int) -> tuple[dict | None, str]:
    """(options of the recipe's format for this layer, "") for a layer the recipe can store, or (None, why not)."""
    if in_f % recipe.in_multiple or out_f % recipe.out_multiple:
        return None, (f"[{out_f}, {in_f}] is not a multiple of [{recipe.out_multiple}, {recipe.in_multiple}] "
                      f"(would need padding)")
    options = dict(recipe.options)
    if recipe.convrot:
        g = _convrot_group(in_f, groupsize)
        if g is None:
            return None, f"no ConvRot group (a power of 4, 16..{groupsize}) divides its {in_f} inputs"
        options["convrot_groupsize"] = g
    return options, ""


def _format(recipe: Recipe):
    from . import quant_formats as qf

    return qf.get(recipe.comfy_format)


def marker_bytes(m: dict) -> bytes:
    """The ``.comfy_quant`` bytes of a marker (:func:`lens_core.quant_formats.marker_tensor`'s, as bytes)."""
    from .quant_formats import marker_tensor

    return marker_tensor(m).numpy().tobytes()


def _stored(t):
    """The tensor as written: E8M0 scales as their bytes (U8, as in the Comfy-Org MXFP8 files)."""
    import torch

    if t.dtype == getattr(torch, "float8_e8m0fnu", None):
        return t.view(torch.uint8)
    return t


def quantize_weight(recipe: Recipe, w, options: dict) -> tuple[dict, dict]:
    """({suffix: tensor} as stored — ``weight``, ``weight_scale`` … —, marker dict) of ``w`` in the recipe's
    format (:meth:`lens_core.quant_formats.QuantFormat.quantize`: comfy-kitchen's quantizer); works on ``meta``
    tensors too (the plan)."""
    tensors, m = _format(recipe).quantize(w, options)
    return {k: _stored(v) for k, v in tensors.items()}, m


@dataclasses.dataclass
class Plan:
    recipe: Recipe
    tensors: list            # [Planned] in file order
    layers: dict             # {layer: (format options, marker dict)} of the quantized Linears
    kept: dict               # {layer: why} of eligible Linears kept in the float dtype
    metadata: dict
    header: bytes
    data_start: int
    total: int


def plan(source, recipe: Recipe, out_dtype, groupsize: int, metadata: dict) -> Plan:
    """Every output tensor (name, dtype, shape, offset) before anything is read or quantized."""
    import torch

    from . import checkpoints as ck
    from .quant_linear import fp8_eligible

    layers, kept, out = {}, {}, []
    order = sorted(source.keys(), key=source.location)
    for key in order:
        shape = tuple(source.shape(key))
        layer = key[: -len(".weight")] if key.endswith(".weight") else None
        if layer is not None and len(shape) == 2 and fp8_eligible(layer):
            options, why = layer_options(recipe, shape[0], shape[1], groupsize)
            if options is None:
                kept[layer] = why
            else:
                with torch.device("meta"):
                    parts, m = quantize_weight(recipe, torch.empty(shape, dtype=torch.float32), options)
                layers[layer] = (options, m)
                for suffix, t in parts.items():
                    out.append(Planned(f"{layer}.{suffix}", t.dtype, tuple(t.shape), key))
                out.append(Planned(f"{layer}.comfy_quant", torch.uint8, (len(marker_bytes(m)),), key))
                continue
        out.append(Planned(key, out_dtype, shape, key))
    metadata = dict(metadata, quantized_layers=str(len(layers)))
    # alignment: 4-byte tensors first, then 2-byte, then 1-byte (each starts at a multiple of its size)
    out.sort(key=lambda t: -t.dtype.itemsize)
    offset = 0
    for t in out:
        t.start = offset
        offset += t.nbytes
    header = {"__metadata__": metadata}
    for t in out:
        header[t.name] = {"dtype": ck.ST_NAMES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [t.start, t.start + t.nbytes]}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % ALIGN)
    return Plan(recipe, out, layers, kept, metadata, raw, 8 + len(raw), 8 + len(raw) + offset)


# ---------------------------------------------------------------------------------------------------------
# source checks


def open_dit(path, out_dtype) -> tuple:
    """(source with canonical names, config, family, (variant, how)) of a Lens DiT checked for conversion."""
    import torch

    from . import checkpoints as ck
    from .checkpoints.assign import IGNORED_KEYS, checked_config
    from .checkpoints.detect import _expect, detect_variant, dit_family, quant_layers, strip_prefix
    from .checkpoints.transformer import check_dit_config, dit_config_from_shapes
    from .config import LensDiTConfig
    from .dit import LensTransformer

    source = ck.open_source(path, "transformer")
    try:
        det = _expect(source, "transformer")
        source = strip_prefix(source, det.prefix)
        if quant_layers(source, "transformer") or source.metadata.get("_quantization_metadata"):
            raise ConvertError(f"{source.origin}: already a quantized ComfyUI file (.comfy_quant layers); "
                               f"quantizing it again would round twice. Fix: convert the bf16 / fp32 release "
                               f"(lens_bf16.safetensors, the diffusers transformer/ folder or an F16 GGUF)")
        quantized = sorted({source.quant_type(k) or source.dtype(k) for k in source.keys()
                            if source.quant_type(k) is not None or source.dtype(k).startswith("F8")})
        if quantized:
            raise ConvertError(f"{source.origin}: holds tensors stored as {quantized} (already quantized); "
                               f"quantizing them again would round twice. Fix: convert a float release "
                               f"(bf16 / fp32 safetensors, the diffusers folder, or a F16/BF16/F32 GGUF)")
        family = dit_family(source, {})
        cfg_dict = source.config if source.config is not None else dit_config_from_shapes(source)
        cfg = checked_config(lambda: LensDiTConfig.from_dict(cfg_dict), source, "transformer")
        check_dit_config(source, cfg)
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in LensTransformer(cfg, dtype=out_dtype).state_dict().items()}
        have = {k for k in source.keys() if not k.endswith(IGNORED_KEYS["transformer"])}
        missing, extra = sorted(set(expected) - have), sorted(have - set(expected))
        if missing or extra:
            raise ConvertError(f"{source.origin}: not a complete Lens DiT of this config (num_layers="
                               f"{cfg.num_layers}): missing {missing[:5]}{' …' if len(missing) > 5 else ''}, "
                               f"unexpected {extra[:5]}{' …' if len(extra) > 5 else ''}; the file is incomplete or "
                               f"another model")
        wrong = [(k, list(source.shape(k)), list(s)) for k, s in expected.items() if tuple(source.shape(k)) != s]
        if wrong:
            raise ConvertError(f"{source.origin}: tensor {wrong[0][0]!r} has shape {wrong[0][1]}, this Lens DiT "
                               f"needs {wrong[0][2]} ({len(wrong)} tensor(s) disagree); the file is corrupt")
        return source, cfg, family, detect_variant(path, source)
    except BaseException:
        source.close()
        raise


# ---------------------------------------------------------------------------------------------------------
# conversion


def _check_out(out: str, overwrite: bool, sources: list[str]) -> str:
    out = os.fspath(out)
    if not out.lower().endswith((".safetensors", ".sft")):
        raise ConvertError(f"OUT {out}: expected a .safetensors file name (ComfyUI lists models/diffusion_models "
                           f"files by that extension); fix: e.g. {os.path.splitext(out)[0]}.safetensors")
    if os.path.isdir(out):
        raise ConvertError(f"OUT {out}: is a folder; fix: name a file in it, e.g. "
                           f"{os.path.join(out, 'lens_int8_convrot.safetensors')}")
    real = os.path.realpath(out)
    if real in {os.path.realpath(s) for s in sources}:
        raise ConvertError(f"OUT {out}: is the input file itself; fix: write the quantized model to a new file")
    if os.path.lexists(out) and not overwrite:
        raise FileExistsError(f"OUT {out}: already exists ({os.path.getsize(out) if os.path.isfile(out) else '?'} "
                              f"bytes); fix: choose another name, or pass --overwrite to replace it")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"OUT {out}: the folder {parent} does not exist; fix: create it first")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"OUT {out}: cannot write in {parent}; fix: choose a writable folder")
    return out


def _free_space(folder: str) -> int | None:
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:      # pragma: no cover - tqdm is a requirement; never fail a conversion for a bar
        return None
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False)


def _pwrite(fd: int, data, offset: int, name: str):
    import torch

    mv = memoryview(data.contiguous().reshape(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(mv):
        n = os.pwrite(fd, mv[done:done + (1 << 30)], offset + done)
        if n <= 0:
            raise OSError(f"writing {name}: the disk accepted no more bytes")
        done += n


def quantize_file(src, out, fmt: str, *, overwrite: bool = False, dtype: str = "bf16", groupsize: int = 256,
                  variant: str | None = None, progress: bool = False, log=None) -> dict:
    """Convert the Lens DiT at ``src`` into the ComfyUI ``.comfy_quant`` file ``out`` in format ``fmt`` (a key
    of :data:`RECIPES`). Returns a summary dict (layers quantized / kept, bytes, seconds)."""
    if fmt not in RECIPES:
        raise ConvertError(f"--format {fmt!r}: expected one of {sorted(RECIPES)}")
    if dtype not in OUT_DTYPES:
        raise ConvertError(f"--dtype {dtype!r}: expected one of {sorted(OUT_DTYPES)}")
    if not isinstance(groupsize, int) or groupsize < 16 or groupsize > 4096 or groupsize & (groupsize - 1) \
            or (groupsize.bit_length() - 1) % 2:
        raise ConvertError(f"--convrot-groupsize {groupsize!r}: expected a power of 4 from 16 to 4096 (ComfyUI's "
                           f"files use 256)")
    import torch

    recipe, out_dtype = RECIPES[fmt], getattr(torch, OUT_DTYPES[dtype])
    require_kitchen()                                           # before anything is read
    t0 = time.perf_counter()
    source, cfg, family, (var, var_src) = open_dit(src, out_dtype)
    tmp = None
    try:
        out = _check_out(out, overwrite, [f.path for f in source.files])
        if variant is not None:
            from .config import variant_name

            var, var_src = variant_name(variant), "caller"
        metadata = {}
        if not var_src.startswith("default"):
            # first: lens_core's variant detection reads metadata in order (see detect.detect_variant)
            metadata["lens_variant"] = {"lens": "Lens", "turbo": "Lens-Turbo", "base": "Lens-Base"}[var]
        metadata.update({"quantized_from": _source_name(src),
                         "quantized_from_family": family, "quantization_format": fmt,
                         "quantized_by": "python -m lens_core quantize (comfy-kitchen "
                                         f"{_kitchen_version()})"})
        p = plan(source, recipe, out_dtype, groupsize, metadata)
        free = _free_space(os.path.dirname(os.path.abspath(out)))
        if free is not None and free < p.total:
            raise OSError(f"OUT {out}: needs {p.total / 1e9:.2f} GB, the disk has {free / 1e9:.2f} GB free; fix: "
                          f"free some space or write elsewhere")
        by_source: dict[str, list] = {}
        for t in p.tensors:
            by_source.setdefault(t.source, []).append(t)
        order = sorted(by_source, key=source.location)
        folder = os.path.dirname(os.path.abspath(out))
        tmp = os.path.join(folder, f".{os.path.basename(out)}.partial-{os.getpid()}")
        bar = _progress(sum(source.entry(k).nbytes for k in order), f"quantize {fmt}", progress)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.ftruncate(fd, p.total)
            os.pwrite(fd, len(p.header).to_bytes(8, "little") + p.header, 0)
            for i, key in enumerate(order):
                if i + 1 < len(order):
                    source.prefetch(order[i + 1])
                _convert_tensor(source, key, by_source[key], p, out_dtype, fd)
                if bar is not None:
                    bar.update(source.entry(key).nbytes)
            os.fsync(fd)
        finally:
            os.close(fd)
            if bar is not None:
                bar.close()
        _publish(tmp, out, overwrite)
        tmp = None
    finally:
        source.close()
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
    summary = {"out": out, "format": fmt, "source": os.fspath(src), "source_family": family, "variant": var,
               "quantized_layers": len(p.layers), "kept_layers": p.kept, "tensors": len(p.tensors),
               "bytes": p.total, "seconds": round(time.perf_counter() - t0, 2)}
    if log is not None:
        log(summary)
    return summary


def _convert_tensor(source, key: str, planned: list, p: Plan, out_dtype, fd: int):
    """Read one source tensor, quantize it if planned, write every output at its offset."""
    import torch

    w = source.read(key, torch.float32)
    if w.is_floating_point() and not bool(torch.isfinite(w).all()):
        bad = int((~torch.isfinite(w)).sum())
        raise ConvertError(f"{source.file_of(key)}: tensor {key!r} holds {bad} NaN/inf value(s); a quantized copy "
                           f"would be garbage. Fix: download the source again")
    layer = key[: -len(".weight")] if key.endswith(".weight") else None
    if layer in p.layers:
        options, m = p.layers[layer]
        tensors, _ = quantize_weight(p.recipe, w, options)
        parts = {f"{layer}.{suffix}": t for suffix, t in tensors.items()}
        parts[f"{layer}.comfy_quant"] = torch.frombuffer(bytearray(marker_bytes(m)), dtype=torch.uint8)
    else:
        parts = {key: w.to(out_dtype)}
    del w
    for t in planned:
        data = parts.pop(t.name)
        if data.dtype != t.dtype or tuple(data.shape) != t.shape:
            raise RuntimeError(f"{t.name}: quantized to {data.dtype} {list(data.shape)}, the plan said {t.dtype} "
                               f"{list(t.shape)} (comfy-kitchen changed its layout?)")
        _pwrite(fd, data, p.data_start + t.start, t.name)


def _publish(tmp: str, out: str, overwrite: bool):
    """Move the finished temporary file to ``out``: atomically, and without replacing a file that appeared in
    the meantime unless ``overwrite``."""
    if overwrite:
        os.replace(tmp, out)
        return
    try:
        os.link(tmp, out)              # fails if out exists: never clobbers
    except FileExistsError:
        raise FileExistsError(f"OUT {out}: a file of that name appeared while converting; fix: choose another "
                              f"name, or pass --overwrite") from None
    except OSError:                    # no hard links on this filesystem
        if os.path.lexists(out):
            raise FileExistsError(f"OUT {out}: already exists; fix: pass --overwrite") from None
        os.replace(tmp, out)
        return
    os.remove(tmp)


def _source_name(src) -> str:
    """The input's name for the metadata: the file or folder name (with its parent for a diffusers
    ``transformer/`` folder, whose own name says nothing); never the whole local path."""
    from .checkpoints.locate import COMPONENT_DIRS

    parts = os.path.normpath(os.path.abspath(os.fspath(src))).split(os.sep)
    return "/".join(parts[-2:]) if parts[-1] in COMPONENT_DIRS and len(parts) > 1 else parts[-1]


def _kitchen_version() -> str:
    try:
        from importlib.metadata import version

        return version("comfy-kitchen")
    except Exception:      # pragma: no cover - metadata missing in odd installs
        return "unknown"


# ---------------------------------------------------------------------------------------------------------
# CLI


def add_parser(sub):
    q = sub.add_parser("quantize", help="convert a Lens DiT into a ComfyUI quantized (.comfy_quant) file",
                       description="Quantize a Lens DiT (diffusers folder, lens_bf16.safetensors, F16 GGUF) into "
                                   "a single .safetensors file that ComfyUI's UNETLoader and this pack load.")
    q.add_argument("input", metavar="IN", help="the Lens DiT: diffusers folder or transformer/, bf16/fp32 "
                                               "safetensors, F16/BF16/F32 GGUF")
    q.add_argument("output", metavar="OUT", help="the .safetensors file to write (never replaced without "
                                                 "--overwrite)")
    q.add_argument("--format", required=True, choices=sorted(RECIPES),
                   help="; ".join(f"{r.name}: {r.help}" for r in RECIPES.values()))
    q.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    q.add_argument("--dtype", default="bf16", choices=sorted(OUT_DTYPES),
                   help="dtype of the layers that stay unquantized (default bf16, as ComfyUI's files)")
    q.add_argument("--convrot-groupsize", type=int, default=256,
                   help="ConvRot rotation group (a power of 4; default 256 as ComfyUI's files; a layer it does "
                        "not divide uses the largest smaller power of 4 that does)")
    q.add_argument("--variant", choices=["lens", "turbo", "base"],
                   help="record this variant in the file (default: the one detected from the input)")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    return q


def run(args) -> int:
    def log(s):
        kept = s["kept_layers"]
        print(f"{s['out']}: {s['format']}, {s['quantized_layers']} Linears quantized, "
              f"{len(kept)} kept in {args.dtype}{' (' + '; '.join(f'{k}: {v}' for k, v in list(kept.items())[:3]) + (' …' if len(kept) > 3 else '') + ')' if kept else ''}, "
              f"{s['bytes'] / 1e9:.3f} GB, variant {s['variant']}, {s['seconds']:.1f} s")

    quantize_file(args.input, args.output, args.format, overwrite=args.overwrite, dtype=args.dtype,
                  groupsize=args.convrot_groupsize, variant=args.variant, progress=not args.quiet, log=log)
    return 0


__all__ = ["RECIPES", "Recipe", "ConvertError", "quantize_file", "plan", "add_parser", "run"]
