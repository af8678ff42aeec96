"""Module construction on meta + per-tensor assignment in file order; the description attached to loaded models."""
from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import nn

from .. import finite
from .. import quant_formats as qf
from .. import readahead
from .detect import COMPONENT_NAMES
from .errors import CheckpointError
from .safetensors import ST_NAMES
from .shapes import block_count, tensor_dims  # noqa: F401  (re-exported: loaders import them from here)
from .source import TensorSource


@contextlib.contextmanager
def init_empty_weights():
    """Build modules with their *parameters* on the meta device (buffers stay real: RoPE tables etc.)."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor, is_param: bool):
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if is_param:
        mod._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        mod._buffers[attr] = value


def _replace_module(model: nn.Module, name: str, new: nn.Module):
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


IGNORED_KEYS = {
    "transformer": (".comfy_quant",),
    "text_encoder": ("lm_head.weight", ".comfy_quant", "tokenizer_json"),
    "vae": ("bn.num_batches_tracked",),
}


def assign_weights(model: nn.Module, source: TensorSource, device, component: str,
                   special: dict | None = None, consumed: set | None = None):
    """Copy every parameter/persistent buffer of ``model`` from ``source`` (cast to the module's dtype).

    ``special`` maps a tensor name to a reader ``fn(source, name, device) -> tensor`` (un-tiling …);
    ``consumed`` names source tensors such readers use besides their own (not "unexpected").
    Missing tensors and unexpected ones (other than known unused keys) raise CheckpointError.
    """
    special = special or {}
    expected = {}
    for n, p in model.named_parameters():
        expected[n] = (p, True)
    persistent = set(model.state_dict().keys())
    for n, b in model.named_buffers():
        if n in persistent:
            expected[n] = (b, False)
    missing = [n for n in expected if n not in source and n not in special]
    if missing:
        raise CheckpointError(f"{source.origin}: {len(missing)} tensor(s) the {COMPONENT_NAMES[component]} needs "
                              f"are missing, e.g. {missing[:4]}; the file is incomplete or of another model size")
    ignored = IGNORED_KEYS.get(component, ())
    consumed = consumed or set()
    unexpected = [k for k in source.keys() if k not in expected and k not in consumed and not k.endswith(ignored)
                  and not any(k == i for i in ignored)]
    if unexpected:
        raise CheckpointError(f"{source.origin}: {len(unexpected)} tensor(s) do not belong to the "
                              f"{COMPONENT_NAMES[component]} built from its config, e.g. {unexpected[:4]}")
    at_load = finite.checked_at_load(component)     # finite check of float tensors as they are read (else 1st use)
    order = sorted(expected, key=source.location)  # file order: sequential reads
    # a helper thread keeps the next bytes of the mapping populated, so disk I/O overlaps the copy/cast
    spans = [source.span(n) or readahead.Span(0, -1, 0, 0) for n in order]
    with readahead.ReadAhead(spans) as ahead:
        for i, n in enumerate(order):
            ref, is_param = expected[n]
            if not ahead.active and i + 1 < len(order):  # no helper here: hint the next tensor's I/O
                source.prefetch(order[i + 1])
            if n in special:
                try:
                    t = special[n](source, n, device)
                except (RuntimeError, ValueError, IndexError, KeyError) as exc:
                    if isinstance(exc, CheckpointError):
                        raise
                    raise CheckpointError(f"{source.origin}: tensor {n!r} cannot be unpacked for the "
                                          f"{COMPONENT_NAMES[component]} ({str(exc)[:200]}); its shape or dtype does "
                                          f"not fit the quantized layout. Fix: download the file again") from None
            else:
                target = ref.dtype
                found = source.dtype(n)
                gguf_quant = n in source.keymap and source.quant_type(n) is not None   # dequantized when read
                if found != ST_NAMES.get(ref.dtype) and not (ref.dtype.is_floating_point and
                                                             (found in FLOAT_ST or gguf_quant)):
                    raise CheckpointError(f"{source.file_of(n)}: tensor {n!r} is {found}, expected "
                                          f"{ST_NAMES.get(ref.dtype) if not ref.dtype.is_floating_point else 'a float type'}"
                                          f"; the file is not this model's checkpoint or is corrupt")
                if tuple(source.shape(n)) != tuple(ref.shape):    # checked before any byte is read
                    raise CheckpointError(f"{source.file_of(n)}: tensor {n!r} has shape {list(source.shape(n))}, "
                                          f"the model built from its config expects {list(ref.shape)}")
                t = source.read(n, target, device)
            ahead.consumed(i)
            if tuple(t.shape) != tuple(ref.shape):
                raise CheckpointError(f"{source.file_of(n) if n in source else source.origin}: tensor {n!r} has "
                                      f"shape {list(t.shape)}, the model built from its config expects "
                                      f"{list(ref.shape)}")
            if at_load:
                finite.check_loaded(t, n, source.file_of(n) if n in source else source.origin)
            _set_tensor(model, n, t, is_param)
    # quantized storage (and the DiT's float weights): checked once, at first use (lens_core.finite)
    finite.check_at_first_use(model, source.origin, floats=not at_load)
    for n, b in model.named_buffers():  # non-persistent buffers computed at construction
        if b.device.type != torch.device(device).type:
            _set_tensor(model, n, b.to(device), False)
    leftovers = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if leftovers:
        raise CheckpointError(f"{source.origin}: parameters left unloaded: {leftovers[:4]}")
    return model


FLOAT_ST = ("F64", "F32", "F16", "BF16")


def checked_config(build, source, component: str):
    """``build()`` (a config constructor fed with untrusted values) with its ValueError turned into a
    CheckpointError naming the config file (or the weights whose shapes it was derived from) and the fix."""
    try:
        return build()
    except (ValueError, TypeError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        where = source.config_path or source.origin
        raise CheckpointError(f"{where}: not a valid {COMPONENT_NAMES[component]} config: {exc}. Fix: use the "
                              f"config.json of this checkpoint's repository (or remove it: configs are derived "
                              f"from the tensors of single files)") from None


def expect_shapes(source, wanted: dict, cfg_desc: str):
    """CheckpointError unless every tensor ``name`` in ``wanted`` exists with exactly shape ``wanted[name]`` —
    run before any module is built, so a config describing a bigger model than the file holds builds nothing."""
    where = source.config_path or "the config"
    for name, shape in wanted.items():
        if name not in source:
            raise CheckpointError(f"{source.origin}: expected tensor {name!r} ({cfg_desc}), found none; the file is "
                                  f"incomplete or not this model")
        found = tuple(source.shape(name))
        if found != tuple(shape):
            raise CheckpointError(f"{source.origin}: {where} implies tensor {name!r} of shape {list(shape)} "
                                  f"({cfg_desc}), the file has {list(found)}; the config does not belong to "
                                  f"these weights. Fix: use this checkpoint's own config.json (or none)")


@dataclasses.dataclass
class CheckpointInfo:
    path: str
    component: str
    family: str
    variant: str | None = None
    variant_source: str = ""
    config: dict | None = None
    extra: dict = dataclasses.field(default_factory=dict)


def read_stored_bytes(source, name, device):
    return source.read_bytes(name, device)


def gguf_plan(source: TensorSource, name: str, mod: nn.Module):
    """The storage-plan entry of a Linear whose weight the GGUF ``source`` stores quantized (``GGUFLinear`` of
    that GGML type, its bytes read as stored: :func:`read_stored_bytes`), or None. Other quantized tensors
    (norms, embeddings) are dequantized when assigned (read())."""
    key = name + ".weight"
    if not isinstance(mod, nn.Linear) or key not in source or not hasattr(source, "quant_type"):
        return None
    qtype = source.quant_type(key) if key in source.keymap else None
    if qtype is None:
        return None
    out_f, in_f = source.shape(key)
    if (out_f, in_f) != (mod.out_features, mod.in_features):
        raise CheckpointError(f"{source.file_of(key)}: tensor {key!r} has shape {[out_f, in_f]}, the model "
                              f"built from its config expects {[mod.out_features, mod.in_features]}")
    return "GGUFLinear", {"qtype": qtype}


def keep_gguf_linears(model: nn.Module, source: TensorSource, dtype, operations=None, skip=()) -> dict:
    """For modules built earlier (the encoder's generation modules, :func:`load_text_encoder_parts`): replace
    every Linear whose weight the GGUF ``source`` stores quantized by ``operations.GGUFLinear`` (on meta) and
    return the readers of their bytes."""
    from ..ops import resolve_operations

    ops = resolve_operations(operations)
    special = {}
    for name, mod in list(model.named_modules()):
        if name in skip:
            continue
        entry = gguf_plan(source, name, mod)
        if entry is None:
            continue
        _replace_module(model, name, ops.GGUFLinear(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                                    device="meta", dtype=dtype, **entry[1]))
        special[name + ".weight"] = read_stored_bytes
    return special


def layer_tensors(source: TensorSource) -> dict:
    """``{module name: {suffix: key}}`` of the tensors of a source (``a.b.weight_scale`` → ``a.b``:
    ``weight_scale``), built once per load to look up a quantized layer's tensors."""
    out = {}
    for k in source.keys():
        mod, _, suffix = k.rpartition(".")
        out.setdefault(mod, {})[suffix] = k
    return out


def quant_plan(source: TensorSource, name: str, marker: dict, out_f: int, in_f: int, dtype, dequantize: bool,
               special: dict, consumed: set, tensors: dict, kind: str = "Linear"):
    """The storage-plan entry of one ``.comfy_quant`` layer, checked against the file before any byte is read:
    the marker's options (group sizes dividing the width …), the layer's stored tensors (dtypes and exact shapes,
    :meth:`lens_core.quant_formats.QuantFormat.layout_of`). Adds the readers to ``special`` (stored tensors kept
    as stored, scales checked for NaN/inf when read). ``tensors``: :func:`layer_tensors`.

    Returns ``(format name, (operation, kwargs) or None)``: None when ``dequantize`` (the layer stays a plain
    Linear whose weight reader dequantizes, in ``dtype``)."""
    try:
        fmt, options = qf.parse_marker(marker, name, in_f)
        fmt.require_kitchen()
        keys = {s: k for s, k in tensors.get(name, {}).items() if s not in ("bias", "comfy_quant")}
        found = {s: (source.dtype(k), tuple(source.shape(k))) for s, k in keys.items()}
        layout = fmt.layout_of(out_f, in_f, options, name, found)
    except qf.QuantFormatError as exc:
        raise CheckpointError(f"{source.origin}: {exc}") from None
    op = "QuantLinear" if kind == "Linear" else "QuantEmbedding"

    def read_all(device):
        got = {}
        for s, (dt, _shape) in layout.items():
            got[s] = qf.as_kept(source.read(keys[s]), dt)
        try:
            fmt.check_values(got, name)
        except qf.QuantFormatError as exc:
            raise CheckpointError(f"{source.origin}: {exc}") from None
        return got

    if dequantize:
        def read_dense(src, key, device):
            # the plain Linear equivalent to the quantized layer (NVFP4's pre_quant_scale folded into W)
            dense = fmt.dense_weight if kind == "Linear" else fmt.dequantize
            return dense(read_all(device), options, (out_f, in_f), dtype).to(device)
        special[keys["weight"]] = read_dense
        consumed.update(k for s, k in keys.items() if s != "weight")
        return fmt.name, None

    def read_one(src, key, device):
        suffix = key.rpartition(".")[2]
        t = qf.as_kept(src.read(key), layout[suffix][0])
        try:
            fmt.check_values({suffix: t}, name)
        except qf.QuantFormatError as exc:
            raise CheckpointError(f"{source.origin}: {exc}") from None
        return t.to(device)
    for s in layout:
        special[keys[s]] = read_one
    return fmt.name, (op, {"fmt": fmt.name, "options": options, "layout": layout})
