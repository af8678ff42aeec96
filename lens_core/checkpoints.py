"""Checkpoint families: detection, key mapping, memory-mapped cast-on-read loading, ``inspect``.

Facts: ../shared/docs/checkpoint_formats.md (families §0, shards §1.2, Comfy DiT files §2, NVFP4 encoder §3,
VAE schemes §4, loader checklist §6) and lens_dit_spec.md §1-2.

Accepted inputs, for every component: a single ``.safetensors`` file, a shard index ``*.safetensors.index.json``,
a component folder (``transformer/``, ``text_encoder/``, ``vae/``, ``tokenizer/``) or a whole diffusers folder
(``model_index.json``). The family and the component are detected from the tensor names (never from the file
name); known prefixes (``model.diffusion_model.``, ``transformer.``, ``vae.`` …) are found from the signature
keys and stripped. Files that are something else (a VAE given as DiT, SD / FLUX.1 checkpoints, pickles,
truncated files …) raise :class:`CheckpointError` naming the file and what it looks like.

Memory: the safetensors header is parsed here and the data section is memory-mapped (private, read-only use);
tensors are read in file order, each copied/cast straight from the mapping into its final dtype and device and
assigned to a module built with its parameters on the ``meta`` device; the mapped pages of that tensor are then
released (``MADV_DONTNEED``), so peak RSS ≈ the resident weights + one tensor + the read-ahead window (fp32
16.4 GB DiT → 8.2 GB bf16; measured 1.04× in BENCHMARKS.md "Loading").

Time: :mod:`lens_core.readahead` runs a helper thread that populates the next 256 MB of the mapping while this
thread copies/casts, so the disk read overlaps the page faults, the zeroing of fresh memory and the casts
(measured 0.84-1.10× one plain read of the file, against 1.4-2.1× without the helper). Without the helper
(non-Linux), the next tensor is hinted with ``MADV_WILLNEED``. Alternatives measured and dropped: positioned
reads into staging buffers with a reader thread (1.45× peak RSS from allocator fragmentation, 1.9× time) and
one ``preadv`` per tensor straight into its destination (2.0× time).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import mmap
import os
import re
from typing import Callable, Iterable

import torch
from torch import nn

from .jsonfile import read_json_object
from . import quant_linear as ql
from . import readahead


class CheckpointError(ValueError):
    """A file or folder that is not (or not a complete / valid) Lens checkpoint of the requested kind."""


# --------------------------------------------------------------------------------------------------
# safetensors reading
# --------------------------------------------------------------------------------------------------
ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
if hasattr(torch, "float8_e8m0fnu"):
    ST_DTYPES["F8_E8M0"] = torch.float8_e8m0fnu
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
_PAGE = mmap.PAGESIZE


@dataclasses.dataclass
class TensorEntry:
    name: str           # key as stored in the file
    dtype: str          # safetensors dtype name
    shape: tuple
    start: int          # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _describe_foreign_file(path: str, head: bytes) -> str:
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return "a pickle / torch.save file"
    if head[:4] == b"GGUF":
        return "a GGUF file"
    return f"a file whose first bytes are {head[:8]!r}"


class SafetensorsFile:
    """One safetensors file: parsed and validated header, memory-mapped data, tensor-by-tensor reads."""

    def __init__(self, path):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"{self.path}: no such file")
        low = self.path.lower()
        if low.endswith(PICKLE_SUFFIXES):
            raise CheckpointError(f"{self.path}: a pickle checkpoint ({os.path.splitext(low)[1]}) is refused "
                                  f"(safetensors only: pickles can run code); convert it or download the "
                                  f".safetensors version")
        self.size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(9)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: expected a safetensors file, found a {self.size}-byte file "
                                      f"(truncated or empty)")
            n = int.from_bytes(head[:8], "little")
            length_ok = 1 < n <= 100_000_000 and 8 + n <= self.size
            # A real header length can begin with any byte (0x80, "PK", ...), so the foreign-format
            # signatures are only consulted when the bytes do not read as a safetensors header.
            if not (length_ok and head[8:9] == b"{") and (head[:4] == b"GGUF" or head[:2] == b"PK" or head[:1] == b"\x80"):
                raise CheckpointError(f"{self.path}: expected a safetensors file, found "
                                      f"{_describe_foreign_file(self.path, head)}; only safetensors is loaded")
            if not length_ok:
                raise CheckpointError(f"{self.path}: expected a safetensors header of {n} bytes after the 8-byte "
                                      f"length, found a {self.size}-byte file (truncated or not safetensors)")
            f.seek(8)
            raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{self.path}: expected a JSON safetensors header, found unreadable bytes "
                                  f"({exc}); the file is corrupt or not safetensors") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: expected a JSON object as safetensors header")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.entries: dict[str, TensorEntry] = {}
        for name, e in header.items():
            try:
                dtype, shape, (a, b) = e["dtype"], tuple(e["shape"]), e["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: malformed header entry for tensor {name!r}") from None
            if dtype not in ST_DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype}")
            itemsize = torch.empty((), dtype=ST_DTYPES[dtype]).element_size()
            if b - a != math.prod(shape) * itemsize:
                raise CheckpointError(f"{self.path}: tensor {name!r} {dtype}{list(shape)} needs "
                                      f"{math.prod(shape) * itemsize} bytes, header gives {b - a}; corrupt file")
            self.entries[name] = TensorEntry(name, dtype, shape, self.data_start + a, self.data_start + b)
        end = max((e.end for e in self.entries.values()), default=self.data_start)
        if end > self.size:
            raise CheckpointError(f"{self.path}: truncated safetensors file: the header describes "
                                  f"{end} bytes, the file has {self.size} (incomplete download?)")
        self._mm = None

    # -- data access -------------------------------------------------------------------------------
    def _map(self):
        if self._mm is None:
            self._file = open(self.path, "rb")  # kept open for posix_fadvise read-ahead hints
            # private copy-on-write mapping: writable for torch.frombuffer, never written
            self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY)
            self._base = torch.frombuffer(self._mm, dtype=torch.uint8, count=1).data_ptr() if self.size else 0
        return self._mm

    def span(self, name: str) -> readahead.Span:
        """Where ``name``'s bytes are mapped, for the background read-ahead helper."""
        e = self.entries[name]
        self._map()
        return readahead.Span(self._base, self._file.fileno(), e.start, e.nbytes)

    def raw(self, name: str) -> torch.Tensor:
        """A tensor viewing the mapped bytes of ``name`` (valid until :meth:`close`; do not keep it)."""
        e = self.entries[name]
        dtype = ST_DTYPES[e.dtype]
        if e.nbytes == 0:
            return torch.empty(e.shape, dtype=dtype)
        buf = torch.frombuffer(self._map(), dtype=torch.uint8, count=e.nbytes, offset=e.start)
        return buf.view(dtype).view(e.shape)

    def prefetch(self, name: str):
        """Ask the kernel to read ``name``'s bytes ahead asynchronously (large I/O instead of page faults)."""
        if not hasattr(mmap, "MADV_WILLNEED"):
            return
        mm = self._map()
        e = self.entries[name]
        a = (e.start // _PAGE) * _PAGE
        if e.end > a:
            with contextlib.suppress(OSError, ValueError):
                mm.madvise(mmap.MADV_WILLNEED, a, e.end - a)

    def release(self, name: str):
        """Drop the mapped pages of ``name`` from this process (they are re-read on demand)."""
        if self._mm is None or not hasattr(self._mm, "madvise"):
            return
        e = self.entries[name]
        a = (e.start // _PAGE) * _PAGE
        b = min(self.size, -(-e.end // _PAGE) * _PAGE)
        if b > a:
            with contextlib.suppress(OSError, ValueError):
                self._mm.madvise(mmap.MADV_DONTNEED, a, b - a)

    def read(self, name: str, dtype=None, device=None) -> torch.Tensor:
        """An owned copy of ``name`` in ``dtype`` on ``device``, read straight from the mapping."""
        src = self.raw(name)
        dst = torch.empty(src.shape, dtype=dtype or src.dtype, device=device or "cpu")
        dst.copy_(src)
        del src
        self.release(name)
        return dst

    def close(self):
        if self._mm is not None:
            with contextlib.suppress(BufferError):
                self._mm.close()
            self._mm = None
            self._file.close()


# --------------------------------------------------------------------------------------------------
# Tensor sources: a file, a shard index or a component folder, with key renaming
# --------------------------------------------------------------------------------------------------
class TensorSource:
    """The tensors of one component, possibly over several shards, under canonical (renamed) keys."""

    def __init__(self, files: list[SafetensorsFile], keymap: dict[str, tuple[SafetensorsFile, str]],
                 origin: str, config: dict | None = None, config_path: str | None = None):
        self.files = files
        self.keymap = keymap
        self.origin = origin
        self.config = config
        self.config_path = config_path

    @property
    def metadata(self) -> dict:
        md = {}
        for f in self.files:
            md.update(f.metadata)
        return md

    def keys(self):
        return self.keymap.keys()

    def __contains__(self, key):
        return key in self.keymap

    def entry(self, key) -> TensorEntry:
        f, k = self.keymap[key]
        return f.entries[k]

    def file_of(self, key) -> str:
        return self.keymap[key][0].path

    def shape(self, key) -> tuple:
        return self.entry(key).shape

    def dtype(self, key) -> str:
        return self.entry(key).dtype

    def read(self, key, dtype=None, device=None) -> torch.Tensor:
        f, k = self.keymap[key]
        return f.read(k, dtype, device)

    def prefetch(self, key):
        if key in self.keymap:
            f, k = self.keymap[key]
            f.prefetch(k)

    def span(self, key) -> readahead.Span | None:
        if key not in self.keymap:
            return None
        f, k = self.keymap[key]
        return f.span(k)

    def location(self, key) -> tuple:
        """(file, byte offset) of ``key``: reading in this order makes the file access sequential."""
        if key not in self.keymap:
            return ("", 0)
        f, k = self.keymap[key]
        return (f.path, f.entries[k].start)

    def rename(self, fn: Callable[[str], str | None]) -> "TensorSource":
        km = {}
        for k, v in self.keymap.items():
            nk = fn(k)
            if nk is not None:
                km[nk] = v
        return TensorSource(self.files, km, self.origin, self.config, self.config_path)

    def nbytes(self) -> int:
        return sum(self.entry(k).nbytes for k in self.keymap)

    def close(self):
        for f in self.files:
            f.close()


COMPONENT_DIRS = {"transformer": "transformer", "text_encoder": "text_encoder", "vae": "vae",
                  "tokenizer": "tokenizer"}


def _read_json(path: str) -> dict:
    return read_json_object(path, "JSON file", CheckpointError)


def _open_index(index_path: str) -> tuple[list[SafetensorsFile], dict]:
    data = _read_json(index_path)
    wm = data.get("weight_map")
    if not isinstance(wm, dict) or not wm:
        raise CheckpointError(f"{index_path}: expected a shard index with a non-empty 'weight_map', found keys "
                              f"{sorted(data)}")
    folder = os.path.dirname(index_path)
    shards = sorted(set(wm.values()))
    missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
    if missing:
        raise CheckpointError(f"{index_path}: the index lists shard(s) {missing} that are missing from {folder} "
                              f"(incomplete download?); present: "
                              f"{sorted(n for n in os.listdir(folder) if n.endswith('.safetensors'))}")
    files = {s: SafetensorsFile(os.path.join(folder, s)) for s in shards}
    keymap = {}
    for key, shard in wm.items():
        f = files[shard]
        if key not in f.entries:
            raise CheckpointError(f"{f.path}: the index {os.path.basename(index_path)} maps tensor {key!r} to this "
                                  f"shard, but the shard does not contain it")
        keymap[key] = (f, key)
    return list(files.values()), keymap


def _refuse_pickles_in(folder: str):
    names = os.listdir(folder)
    pick = [n for n in names if n.lower().endswith(PICKLE_SUFFIXES)]
    if pick:
        raise CheckpointError(f"{folder}: expected .safetensors weights, found only pickle file(s) {sorted(pick)}; "
                              f"pickles are refused (safetensors only)")


def open_component_folder(folder: str) -> TensorSource:
    """A folder holding one model: ``*.safetensors.index.json`` + shards, or one ``*.safetensors`` file."""
    names = sorted(os.listdir(folder))
    cfg_path = os.path.join(folder, "config.json")
    config = _read_json(cfg_path) if os.path.isfile(cfg_path) else None
    indexes = [n for n in names if n.endswith(".safetensors.index.json")]
    if indexes:
        files, keymap = _open_index(os.path.join(folder, indexes[0]))
        origin = os.path.join(folder, indexes[0])
    else:
        st = [n for n in names if n.endswith(".safetensors")]
        if not st:
            _refuse_pickles_in(folder)
            raise CheckpointError(f"{folder}: expected .safetensors weights (or a shard index), found {names}")
        if len(st) > 1:
            raise CheckpointError(f"{folder}: found several .safetensors files {st} but no "
                                  f"*.safetensors.index.json shard index; pass one file explicitly")
        f = SafetensorsFile(os.path.join(folder, st[0]))
        files, keymap, origin = [f], {k: (f, k) for k in f.entries}, f.path
    return TensorSource(files, keymap, origin, config, cfg_path if config is not None else None)


def is_diffusers_root(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "model_index.json"))


def open_source(path, component: str | None = None) -> TensorSource:
    """The raw tensors behind ``path`` for ``component`` (``transformer``/``text_encoder``/``vae``)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    if os.path.isdir(path):
        if component and is_diffusers_root(path) or (component and os.path.isdir(os.path.join(path, component))
                                                     and not _has_weights(path)):
            sub = os.path.join(path, COMPONENT_DIRS[component])
            if not os.path.isdir(sub):
                raise CheckpointError(f"{path}: a diffusers Lens folder without a '{component}/' subfolder "
                                      f"(found {sorted(os.listdir(path))})")
            return open_component_folder(sub)
        return open_component_folder(path)
    if path.endswith(".json"):
        files, keymap = _open_index(path)
        folder = os.path.dirname(path)
        cfg_path = os.path.join(folder, "config.json")
        config = _read_json(cfg_path) if os.path.isfile(cfg_path) else None
        return TensorSource(files, keymap, path, config, cfg_path if config is not None else None)
    f = SafetensorsFile(path)
    folder = os.path.dirname(os.path.abspath(path))
    cfg_path = os.path.join(folder, "config.json")
    config = None
    # a weight file inside a diffusers component folder (diffusers/transformers file names) uses its config.json;
    # a single file dropped next to some unrelated config.json does not
    if os.path.isfile(cfg_path) and os.path.basename(path).startswith(("diffusion_pytorch_model", "model")):
        with contextlib.suppress(CheckpointError):
            config = _read_json(cfg_path)
    return TensorSource([f], {k: (f, k) for k in f.entries}, path, config,
                        cfg_path if config is not None else None)


def _has_weights(folder: str) -> bool:
    return any(n.endswith((".safetensors", ".safetensors.index.json")) for n in os.listdir(folder))


# --------------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------------
DIT_SIGNATURE = ("transformer_blocks.0.img_mlp.w1.weight", "transformer_blocks.0.attn.norm_added_q.weight")
TE_SIGNATURE = "layers.0.self_attn.sinks"
VAE_DIFFUSERS_SIGNATURE = ("decoder.conv_in.weight", "encoder.down_blocks.0.resnets.0.conv1.weight")
VAE_BFL_SIGNATURE = ("decoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight")

# (name pattern, description) of checkpoints that are not Lens components; searched anywhere in a key
FOREIGN = [
    ("input_blocks.0.0.weight", "a Stable Diffusion 1.x/2.x/SDXL UNet checkpoint"),
    ("double_blocks.0.img_attn.qkv.weight", "a FLUX (BFL) transformer checkpoint (double_blocks/single_blocks)"),
    ("joint_blocks.0.", "a Stable Diffusion 3 MMDiT checkpoint"),
    ("transformer_blocks.0.img_mlp.net.0.proj.weight", "a Qwen-Image transformer checkpoint"),
    ("single_transformer_blocks.0.", "a diffusers FLUX transformer checkpoint"),
    ("encoder.block.0.layer.0.SelfAttention", "a T5 text encoder"),
    ("text_model.encoder.layers.0.", "a CLIP text encoder"),
    ("layers.0.self_attn.q_proj.weight", "a decoder-only LLM text encoder without attention sinks (not GPT-OSS)"),
    ("lora_", "a LoRA file"),
    ("lora.", "a LoRA file"),
]


def _find_prefix(keys: Iterable[str], suffix: str) -> str | None:
    for k in keys:
        if k.endswith(suffix) and (len(k) == len(suffix) or k[-len(suffix) - 1] == "."):
            return k[: len(k) - len(suffix)]
    return None


@dataclasses.dataclass
class Detection:
    component: str | None         # transformer / text_encoder / vae / None
    prefix: str = ""
    scheme: str = ""              # vae: diffusers / bfl
    description: str = ""


def detect(keys: Iterable[str]) -> Detection:
    """Which Lens component a set of tensor names is (from signature keys), and the prefix to strip."""
    keys = list(keys)
    ks = set(keys)
    p = _find_prefix(keys, DIT_SIGNATURE[0])
    if p is not None and p + DIT_SIGNATURE[1] in ks:
        return Detection("transformer", p, description="a Lens DiT (LensTransformer2DModel)")
    p = _find_prefix(keys, TE_SIGNATURE)
    if p is not None:
        return Detection("text_encoder", p, description="a GPT-OSS text encoder")
    p = _find_prefix(keys, VAE_DIFFUSERS_SIGNATURE[1])
    if p is not None and p + VAE_DIFFUSERS_SIGNATURE[0] in ks:
        if p + "bn.running_mean" in ks:
            return Detection("vae", p, "diffusers", "a FLUX.2 VAE (diffusers key names)")
        return Detection(None, p, description="a VAE without the FLUX.2 BN statistics (an SD / FLUX.1 VAE)")
    p = _find_prefix(keys, VAE_BFL_SIGNATURE[1])
    if p is not None and p + VAE_BFL_SIGNATURE[0] in ks:
        if p + "bn.running_mean" in ks:
            return Detection("vae", p, "bfl", "a FLUX.2 VAE (BFL/LDM key names)")
        return Detection(None, p, description="a VAE without the FLUX.2 BN statistics (an SD / FLUX.1 VAE)")
    for pat, desc in FOREIGN:
        if any(pat in k for k in keys):
            return Detection(None, description=desc)
    sample = sorted(keys)[:3]
    return Detection(None, description=f"an unknown checkpoint ({len(keys)} tensors, e.g. {sample})")


COMPONENT_NAMES = {"transformer": "Lens DiT (transformer)", "text_encoder": "GPT-OSS text encoder",
                   "vae": "FLUX.2 VAE"}


def _expect(source: TensorSource, component: str) -> Detection:
    det = detect(source.keys())
    if det.component != component:
        raise CheckpointError(f"{source.origin}: expected a {COMPONENT_NAMES[component]} checkpoint, but this "
                              f"looks like {det.description}")
    return det


def strip_prefix(source: TensorSource, prefix: str) -> TensorSource:
    if not prefix:
        return source
    return source.rename(lambda k: k[len(prefix):] if k.startswith(prefix) else None)


# --------------------------------------------------------------------------------------------------
# Quantization markers
# --------------------------------------------------------------------------------------------------
QUANT_FORMATS = {"transformer": ("mxfp8",), "text_encoder": ("nvfp4",)}


def quant_layers(source: TensorSource, component: str) -> dict[str, dict]:
    """{layer name: marker dict} from ``L.comfy_quant`` tensors and a header ``_quantization_metadata``.

    Raises CheckpointError for a format this component does not support (naming the file and layer).
    """
    layers = {}
    md = source.metadata.get("_quantization_metadata")
    if md:
        try:
            layers.update(json.loads(md).get("layers", {}))
        except (json.JSONDecodeError, AttributeError):
            raise CheckpointError(f"{source.origin}: unreadable _quantization_metadata header entry") from None
    for k in source.keys():
        if k.endswith(".comfy_quant"):
            raw = source.read(k)
            try:
                layers[k[: -len(".comfy_quant")]] = json.loads(bytes(raw.to(torch.uint8).tolist()).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise CheckpointError(f"{source.file_of(k)}: tensor {k!r} is not a JSON quantization marker") \
                    from None
    allowed = QUANT_FORMATS.get(component, ())
    for name, m in layers.items():
        fmt = m.get("format") if isinstance(m, dict) else None
        if fmt not in allowed:
            raise CheckpointError(f"{source.origin}: layer {name!r} carries the quantization marker format "
                                  f"{fmt!r}, which this loader does not know; supported for the "
                                  f"{COMPONENT_NAMES[component]}: {list(allowed) or 'none'}")
    return layers


# --------------------------------------------------------------------------------------------------
# Variant
# --------------------------------------------------------------------------------------------------
def detect_variant(path, source: TensorSource | None = None, override: str | None = None) -> tuple[str, str]:
    """(variant, how it was decided): caller override, then metadata/config text, then the path name."""
    from .config import variant_name

    if override:
        return variant_name(override), "caller"
    texts = []
    if source is not None:
        texts += [f"{k}={v}" for k, v in source.metadata.items() if isinstance(v, str) and len(v) < 4096
                  and k != "_quantization_metadata"]
        if source.config:
            texts += [str(source.config.get(k, "")) for k in ("_name_or_path", "variant", "_lens_variant")]
    for t in texts:
        v = _variant_from_text(t)
        if v:
            return v, "metadata/config"
    p = os.path.abspath(os.fspath(path))
    for part in reversed(p.split(os.sep)):
        v = _variant_from_text(part)
        if v:
            return v, "path name"
    return "lens", "default (no variant hint found)"


def _variant_from_text(text: str) -> str | None:
    t = text.lower()
    if re.search(r"lens[-_ ]?turbo|turbo", t):
        return "turbo"
    if re.search(r"lens[-_ ]?base", t):
        return "base"
    if re.search(r"(^|[^a-z])lens([^a-z]|$)", t):
        return "lens"
    return None


# --------------------------------------------------------------------------------------------------
# Module construction on meta + per-tensor assignment
# --------------------------------------------------------------------------------------------------
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
    order = sorted(expected, key=source.location)  # file order: sequential reads
    # a helper thread keeps the next bytes of the mapping populated, so disk I/O overlaps the copy/cast
    spans = [source.span(n) or readahead.Span(0, -1, 0, 0) for n in order]
    with readahead.ReadAhead(spans) as ahead:
        for i, n in enumerate(order):
            ref, is_param = expected[n]
            if not ahead.active and i + 1 < len(order):  # no helper here: hint the next tensor's I/O
                source.prefetch(order[i + 1])
            if n in special:
                t = special[n](source, n, device)
            else:
                target = ref.dtype
                if not ref.dtype.is_floating_point and source.dtype(n) != ST_NAMES.get(ref.dtype):
                    raise CheckpointError(f"{source.file_of(n)}: tensor {n!r} is {source.dtype(n)}, expected "
                                          f"{ST_NAMES.get(ref.dtype)}")
                t = source.read(n, target, device)
            ahead.consumed(i)
            if tuple(t.shape) != tuple(ref.shape):
                raise CheckpointError(f"{source.file_of(n) if n in source else source.origin}: tensor {n!r} has "
                                      f"shape {list(t.shape)}, the model built from its config expects "
                                      f"{list(ref.shape)}")
            _set_tensor(model, n, t, is_param)
    for n, b in model.named_buffers():  # non-persistent buffers computed at construction
        if b.device.type != torch.device(device).type:
            _set_tensor(model, n, b.to(device), False)
    leftovers = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if leftovers:
        raise CheckpointError(f"{source.origin}: parameters left unloaded: {leftovers[:4]}")
    return model


# --------------------------------------------------------------------------------------------------
# Checkpoint description attached to loaded models
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class CheckpointInfo:
    path: str
    component: str
    family: str
    variant: str | None = None
    variant_source: str = ""
    config: dict | None = None
    extra: dict = dataclasses.field(default_factory=dict)


def _dtype_summary(source: TensorSource) -> str:
    counts = {}
    for k in source.keys():
        e = source.entry(k)
        counts[e.dtype] = counts.get(e.dtype, 0) + e.nbytes
    return ", ".join(f"{d} {b / 1e6:.1f} MB" for d, b in sorted(counts.items(), key=lambda x: -x[1]))


# --------------------------------------------------------------------------------------------------
# DiT
# --------------------------------------------------------------------------------------------------
def dit_config_from_shapes(source: TensorSource) -> dict:
    """The transformer config of a single file without config.json (as ComfyUI derives it)."""
    from .config import REAL_DIT_CONFIG

    keys = list(source.keys())
    heads_dim = 64
    width = source.shape("img_in.weight")[0]
    n_layers = 1 + max(int(m.group(1)) for k in keys if (m := re.match(r"transformer_blocks\.(\d+)\.", k)))
    n_txt = len({k for k in keys if re.match(r"txt_norm\.\d+\.weight$", k)})
    cfg = REAL_DIT_CONFIG.to_dict()
    cfg.update(in_channels=source.shape("img_in.weight")[1], out_channels=source.shape("proj_out.weight")[0] // 4,
               num_layers=n_layers, attention_head_dim=heads_dim, num_attention_heads=width // heads_dim,
               inner_dim=width, enc_hidden_dim=source.shape("txt_norm.0.weight")[0])
    if n_txt != 4:
        raise CheckpointError(f"{source.origin}: expected 4 txt_norm.N layers, found {n_txt}")
    return cfg


def dit_family(source: TensorSource, qlayers: dict) -> str:
    if qlayers or any(source.dtype(k) == "F8_E4M3" for k in source.keys() if k.endswith(".weight")):
        return "comfy-dit-mxfp8"
    if source.config is not None or len(source.files) > 1:
        return "diffusers-transformer"
    return "comfy-dit-bf16"


def _mxfp8_scale_reader(rows, cols):
    def read(source, name, device):
        stored = source.read(name, torch.uint8 if source.dtype(name) == "U8" else None, "cpu")
        stored = stored.view(torch.uint8)
        return ql.untile_scales(stored, rows, cols // ql.MXFP8_BLOCK).contiguous().to(device)
    return read


def load_transformer(path, dtype=torch.bfloat16, device="cpu", operations=None, config=None,
                     variant: str | None = None, fp8: bool = False, mxfp8_dequantize: bool = False):
    """A ``LensTransformer`` from any DiT family (diffusers folder/shards, Comfy bf16 or mxfp8 file).

    ``dtype`` is the compute/storage dtype of the float weights (fp32 shards are cast tensor by tensor).
    ``fp8=True`` stores eligible Linears (not img_mod/txt_mod, not norms) as float8_e4m3fn + row scale.
    MXFP8 layers stay MXFP8 (dequantized per call) unless ``mxfp8_dequantize=True``.
    ``config`` (dict or LensDiTConfig) overrides config.json / shape-derived values.
    """
    from .config import LensDiTConfig
    from .dit import LensTransformer

    source = open_source(path, "transformer")
    det = _expect(source, "transformer")
    source = strip_prefix(source, det.prefix)
    qlayers = quant_layers(source, "transformer")
    family = dit_family(source, qlayers)
    if config is None:
        cfg_dict = source.config if source.config is not None else dit_config_from_shapes(source)
    else:
        cfg_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    cfg = LensDiTConfig.from_dict(cfg_dict)
    var, var_src = detect_variant(path, source, variant)

    # layers stored as MXFP8: a weight_scale sibling + fp8 weight (with or without a comfy_quant marker)
    mx = {k[: -len(".weight_scale")] for k in source.keys() if k.endswith(".weight_scale")
          and source.dtype(k[: -len("_scale")]) == "F8_E4M3"}
    missing_scale = [n for n in qlayers if n not in mx]
    if missing_scale:
        raise CheckpointError(f"{source.origin}: layer(s) {missing_scale[:3]} are marked mxfp8 but have no "
                              f"F8_E4M3 weight + weight_scale pair")
    with init_empty_weights():
        model = LensTransformer(cfg, operations=operations, device=None, dtype=dtype)
    special, consumed = {}, set()
    for name, mod in list(model.named_modules()):
        if name in mx:
            out_f, in_f = source.shape(name + ".weight")
            rows, cols = out_f, in_f
            if mxfp8_dequantize:
                special[name + ".weight"] = _mxfp8_dequant_reader(name, rows, cols, dtype)
                consumed.add(name + ".weight_scale")
                continue
            has_bias = (name + ".bias") in source
            new = ql.MXFP8Linear(in_f, out_f, bias=has_bias, device="meta", dtype=dtype)
            _replace_module(model, name, new)
            special[name + ".weight_scale"] = _mxfp8_scale_reader(rows, cols)
        elif fp8 and isinstance(mod, nn.Linear) and ql.fp8_eligible(name) and (name + ".weight") in source:
            new = ql.FP8Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta",
                               dtype=dtype)
            _replace_module(model, name, new)
            special[name + ".weight"], special[name + ".weight_scale"] = _fp8_readers(name)
    assign_weights(model, source, device, "transformer", special, consumed)
    model.eval()
    model.lens_checkpoint = CheckpointInfo(source.origin, "transformer", family, var, var_src, cfg.to_dict(),
                                           {"dtypes": _dtype_summary(source), "mxfp8_layers": len(mx),
                                            "fp8": fp8})
    source.close()
    return model


def _mxfp8_dequant_reader(layer, rows, cols, dtype):
    def read(source, name, device):
        w = source.read(name)
        s = source.read(layer + ".weight_scale").view(torch.uint8)
        s = ql.untile_scales(s, rows, cols // ql.MXFP8_BLOCK)
        return ql.dequantize_mxfp8(w, s, dtype).to(device)
    return read


def _fp8_readers(layer):
    """(weight reader, scale reader) for one fp8-stored Linear: the weight is quantized row-wise once, on
    whichever of the two is assigned first."""
    parts = {}

    def quantized(source, device, which):
        if not parts:
            data, scale = ql.quantize_fp8_rowwise(source.read(layer + ".weight", torch.float32))
            parts.update(weight=data, scale=scale)
        return parts.pop(which).to(device)

    return (lambda source, name, device: quantized(source, device, "weight"),
            lambda source, name, device: quantized(source, device, "scale"))


# --------------------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------------------
class DictSource(TensorSource):
    """Already-read tensors under canonical names (used after a whole-dict key mapping, e.g. BFL → diffusers)."""

    def __init__(self, tensors: dict, origin: str):
        super().__init__([], {}, origin)
        self.tensors = tensors

    def keys(self):
        return self.tensors.keys()

    def __contains__(self, key):
        return key in self.tensors

    def shape(self, key):
        return tuple(self.tensors[key].shape)

    def dtype(self, key):
        return ST_NAMES[self.tensors[key].dtype]

    def file_of(self, key):
        return self.origin

    def read(self, key, dtype=None, device=None):
        return self.tensors.pop(key).to(dtype=dtype, device=device)

    def prefetch(self, key):
        pass

    def location(self, key):
        return ("", 0)


def load_vae(path, dtype=torch.float32, device="cpu", operations=None, config=None):
    """A ``LensVAE`` from a diffusers ``vae/`` folder, a whole diffusers folder, or a single
    ``flux2-vae.safetensors`` in the diffusers or BFL naming. ``config`` overrides config.json / the real FLUX.2
    config (shape-derived widths)."""
    from . import vae as vae_mod

    source = open_source(path, "vae")
    det = _expect(source, "vae")
    source = strip_prefix(source, det.prefix)
    # the VAE is small (336 MB fp32): read it whole (cast on read), then map the names in one go
    tensors = {k: source.read(k, None if not _is_float_st(source.dtype(k)) else dtype) for k in source.keys()}
    tensors = vae_mod.prepare_vae_state_dict(tensors)
    if config is not None:
        cfg = config if isinstance(config, vae_mod.VAEConfig) else vae_mod.VAEConfig.from_dict(dict(config))
    elif source.config is not None:
        cfg = vae_mod.VAEConfig.from_dict(source.config)
    else:
        cfg = vae_mod.infer_vae_config(tensors)
    with init_empty_weights():
        model = vae_mod.LensVAE(cfg, operations=operations, device=None, dtype=dtype)
    family = ("diffusers-vae" if source.config is not None else "vae-diffusers") if det.scheme == "diffusers" \
        else "vae-bfl"
    origin = source.origin
    source.close()
    assign_weights(model, DictSource(tensors, origin), device, "vae")
    model.eval()
    model.lens_checkpoint = CheckpointInfo(origin, "vae", family, None, "", cfg.to_dict(), {"scheme": det.scheme})
    return model


def _is_float_st(name: str) -> bool:
    return name in ("F64", "F32", "F16", "BF16")


# --------------------------------------------------------------------------------------------------
# Text encoder
# --------------------------------------------------------------------------------------------------
NVFP4_TE_SUFFIX = "mlp.experts.gate_up_proj.weight"


def te_family(source: TensorSource) -> str:
    if any(k.endswith(NVFP4_TE_SUFFIX) for k in source.keys()):
        return "comfy-te-nvfp4"
    if any(k.endswith("gate_up_proj_blocks") for k in source.keys()):
        return "diffusers-text-encoder-mxfp4"
    return "text-encoder-dense"


#: the released GPT-OSS-20B config (text_encoder_spec.md §1.2), used for single files without config.json
REAL_TE_CONFIG = {
    "num_hidden_layers": 24, "hidden_size": 2880, "head_dim": 64, "num_attention_heads": 64,
    "num_key_value_heads": 8, "intermediate_size": 2880, "num_local_experts": 32, "num_experts_per_tok": 4,
    "experts_per_token": 4, "attention_bias": True, "rms_norm_eps": 1e-5, "sliding_window": 128,
    "swiglu_limit": 7.0, "swiglu_alpha": 1.702, "vocab_size": 201088, "max_position_embeddings": 131072,
    "pad_token_id": 199999, "eos_token_id": 200002, "tie_word_embeddings": False, "model_type": "gpt_oss",
    "initial_context_length": 4096,
    "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                        "beta_slow": 1.0, "original_max_position_embeddings": 4096, "truncate": False},
    "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(24)],
}
REAL_SELECTED_LAYERS = (5, 11, 17, 23)


def te_config_from_shapes(source: TensorSource) -> dict:
    """The real GPT-OSS-20B config with the sizes that shapes reveal (layers, widths, heads, experts)."""
    cfg = json.loads(json.dumps(REAL_TE_CONFIG))
    keys = list(source.keys())
    n = 1 + max(int(m.group(1)) for k in keys if (m := re.match(r"model\.layers\.(\d+)\.", k)))
    vocab, hidden = source.shape("model.embed_tokens.weight")
    hd = cfg["head_dim"]
    experts = source.shape("model.layers.0.mlp.router.weight")[0]
    cfg.update(num_hidden_layers=n, hidden_size=hidden, vocab_size=vocab, num_local_experts=experts,
               num_attention_heads=source.shape("model.layers.0.self_attn.q_proj.weight")[0] // hd,
               num_key_value_heads=source.shape("model.layers.0.self_attn.k_proj.weight")[0] // hd,
               layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)])
    return cfg


_NVFP4_RENAMES = ((".weight_scale_2", "_scales_2"), (".weight_scale", "_scales"), (".weight", "_blocks"),
                  (".bias", "_bias"))


def _to_hf_te_name(k: str) -> str:
    """Comfy NVFP4 names (no ``model.``; ``experts.<proj>.weight`` …) → the names of ``LensTextEncoder``
    (``model.`` prefix; ``experts.<proj>_blocks/_scales/_scales_2/_bias``, quant.PackedExperts fmt "nvfp4")."""
    if k == "tokenizer_json" or k.startswith(("model.", "lm_head.")):
        return k
    k = "model." + k
    m = re.match(r"(.*\.mlp\.experts\.(?:gate_up|down)_proj)(\.\w+)$", k)
    if m:
        for old, new in _NVFP4_RENAMES:
            if m.group(2) == old:
                return m.group(1) + new
    return k


def _nvfp4_scale_reader(source, name, device):
    """Un-tile one NVFP4 bank's per-expert E4M3 block scales ``[E, Rp, Cp]`` → ``[E, out, in/16]``."""
    from .quant import NVFP4_BLOCK, untile_block_scales

    e, rows, half = source.shape(name[: -len("_scales")] + "_blocks")
    stored = source.read(name, None, "cpu")
    if stored.dtype != torch.float8_e4m3fn:
        stored = stored.view(torch.float8_e4m3fn)
    return untile_block_scales(stored, rows, half * 2 // NVFP4_BLOCK).contiguous().to(device)


def load_text_encoder(path, dtype=torch.bfloat16, device="cpu", operations=None, config=None,
                      selected_layers=None, experts: str = "packed"):
    """A ``LensTextEncoder`` from the diffusers MXFP4 ``text_encoder/`` (folder, index or whole diffusers folder)
    or the Comfy-Org NVFP4 single file. Experts stay packed (dequantized per call) unless
    ``experts="dequantized"``. ``selected_layers`` defaults to the transformer config's
    ``selected_layer_index`` of a diffusers folder, else the real (5, 11, 17, 23)."""
    from . import text_encoder as te_mod

    source = open_source(path, "text_encoder")
    det = _expect(source, "text_encoder")
    source = strip_prefix(source, det.prefix)
    family = te_family(source)
    quant_layers(source, "text_encoder")
    source = source.rename(_to_hf_te_name)
    if config is None:
        cfg_dict = source.config if source.config is not None else te_config_from_shapes(source)
    else:
        cfg_dict = dict(config)
    cfg = te_mod.TextEncoderConfig.from_dict(cfg_dict)
    if selected_layers is None:
        selected_layers = _selected_layers_near(path) or REAL_SELECTED_LAYERS
    kwargs = dict(selected_layers=tuple(selected_layers), operations=operations, device=None, dtype=dtype,
                  experts=experts)
    if family == "comfy-te-nvfp4":
        kwargs["expert_format"] = "nvfp4"
    with init_empty_weights():
        model = te_mod.LensTextEncoder(cfg, **kwargs)
    # layers after the last selected one, lm_head and the final norm are never used for features
    consumed = {k for k in source.keys() if model.is_unused_key(k)}
    special = {k: _nvfp4_scale_reader for k in source.keys()
               if family == "comfy-te-nvfp4" and k.endswith("_proj_scales") and k not in consumed}
    assign_weights(model, source, device, "text_encoder", special, consumed)
    model.eval()
    model.lens_checkpoint = CheckpointInfo(source.origin, "text_encoder", family, None, "", cfg_dict,
                                           {"dtypes": _dtype_summary(source),
                                            "selected_layers": list(selected_layers),
                                            "embedded_tokenizer": "tokenizer_json" in source})
    source.close()
    return model


GENERATION_FIX = ("load the text encoder from the diffusers text_encoder/ folder of microsoft/Lens, Lens-Turbo or "
                  "Lens-Base (13.8 GB, it has lm_head.weight and model.norm.weight) and use that one for the prompt "
                  "enhancer; the feature encoder itself works with this file")


def load_text_encoder_parts(model, path, names, device="cpu"):
    """Load the tensors ``names`` (state-dict keys of ``model``, a ``LensTextEncoder``, whose modules were just
    built on ``meta`` — e.g. by ``add_generation_modules_``) from the text-encoder checkpoint ``path``, cast to
    their dtype, onto ``device``. Nothing else of ``model`` is read or replaced. A checkpoint without them (the
    Comfy-Org NVFP4 file has no ``lm_head`` / final norm) raises CheckpointError naming the file to use."""
    names = list(names)
    source = open_source(path, "text_encoder")
    try:
        det = _expect(source, "text_encoder")
        # lm_head sits beside the "model." body (HF layout): keep it while stripping the detected prefix
        outer = det.prefix[: -len("model.")] if det.prefix.endswith("model.") else det.prefix
        source = source.rename(lambda k: k[len(det.prefix):] if k.startswith(det.prefix) else
                               k[len(outer):] if k.startswith(outer + "lm_head.") else None)
        family = te_family(source)
        quant_layers(source, "text_encoder")
        source = source.rename(_to_hf_te_name)
        missing = [n for n in names if n not in source]
        if family == "comfy-te-nvfp4":   # its scales are read through the un-tiling reader, not by name
            missing = [n for n in missing if not n.endswith("_proj_scales")]
        if missing:
            raise CheckpointError(f"{source.origin}: text generation (the prompt enhancer) needs {len(missing)} "
                                  f"tensor(s) this {family} checkpoint does not have, e.g. {missing[:3]}"
                                  + ("; the Comfy-Org gpt_oss_20b_nvfp4.safetensors carries no lm_head"
                                     if family == "comfy-te-nvfp4" else "") + f". Fix: {GENERATION_FIX}")
        holder, layers = nn.Module(), nn.ModuleDict()
        holder.model = nn.Module()
        for n in names:
            if n.startswith("model.layers."):
                i = n.split(".")[2]
                layers[i] = model.model.layers[int(i)]
            elif n.startswith("model.norm."):
                holder.model.norm = model.model.norm
            elif n.startswith("lm_head."):
                holder.lm_head = model.lm_head
            else:
                raise ValueError(f"load_text_encoder_parts: {n!r} is not a generation-module key")
        if len(layers):
            holder.model.layers = layers
        if set(holder.state_dict()) != set(names):
            raise ValueError(f"load_text_encoder_parts: {sorted(set(holder.state_dict()) ^ set(names))[:4]} do not "
                             f"match whole modules of the encoder")
        special = {n: _nvfp4_scale_reader for n in names if family == "comfy-te-nvfp4" and n.endswith("_proj_scales")}
        blocks = {n[: -len("_scales")] + "_blocks" for n in special}
        wanted = set(names) | blocks
        part = source.rename(lambda k: k if k in wanted else None)
        assign_weights(holder, part, device, "text_encoder", special, blocks - set(names))
    finally:
        source.close()
    return model


def _selected_layers_near(path) -> list | None:
    """``selected_layer_index`` of the transformer config in the same diffusers folder, if any."""
    path = os.path.abspath(os.fspath(path))
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    for root in (folder, os.path.dirname(folder)):
        cfg = os.path.join(root, "transformer", "config.json")
        if os.path.isfile(cfg):
            return list(_read_json(cfg).get("selected_layer_index") or []) or None
    return None


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------
def load_tokenizer(path):
    """The o200k_harmony tokenizer from a diffusers folder (``tokenizer/``), a tokenizer folder, a
    ``tokenizer.json`` file, or the NVFP4 text-encoder file's embedded ``tokenizer_json`` tensor."""
    from . import prompt

    p = os.fspath(path)
    if not os.path.exists(p):
        raise FileNotFoundError(f"{p}: no such file or folder")
    if os.path.isdir(p):
        for cand in (os.path.join(p, "tokenizer.json"), os.path.join(p, "tokenizer", "tokenizer.json")):
            if os.path.isfile(cand):
                return prompt.load_tokenizer(os.path.dirname(cand))
        sub = os.path.join(p, "tokenizer")
        listing = sorted(os.listdir(sub)) if os.path.isdir(sub) else sorted(os.listdir(p))
        raise CheckpointError(f"{p}: a folder without tokenizer: expected tokenizer/tokenizer.json (or "
                              f"tokenizer.json), found {listing}; copy the o200k_harmony tokenizer.json of Lens / "
                              f"gpt-oss into it, or pass the NVFP4 text-encoder file that embeds it")
    if p.endswith(".json"):
        return prompt.load_tokenizer(p)
    f = SafetensorsFile(p)
    try:
        if "tokenizer_json" not in f.entries:
            det = detect(f.entries)
            raise CheckpointError(f"{p}: expected a tokenizer (tokenizer.json, a folder, or a text-encoder file "
                                  f"with an embedded 'tokenizer_json' tensor), found {det.description} without "
                                  f"an embedded tokenizer")
        raw = f.read("tokenizer_json")
    finally:
        f.close()
    return prompt.load_tokenizer(raw)


# --------------------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------------------
def inspect(path, variant: str | None = None) -> dict:
    """What ``path`` is: family, component, variant, dtypes, tensor count and size (nothing is loaded).

    A diffusers folder returns ``{"family": "diffusers", "components": {name: {...}}, ...}``.
    """
    p = os.fspath(path)
    if not os.path.exists(p):
        raise FileNotFoundError(f"{p}: no such file or folder")
    if is_diffusers_root(p):
        comps = {}
        for c in ("transformer", "text_encoder", "vae"):
            try:
                comps[c] = inspect(os.path.join(p, c), variant)
            except (CheckpointError, FileNotFoundError) as exc:
                comps[c] = {"error": str(exc)}
        tok = os.path.join(p, "tokenizer", "tokenizer.json")
        comps["tokenizer"] = ({"path": tok, "size_bytes": os.path.getsize(tok)} if os.path.isfile(tok)
                              else {"error": f"{p}: no tokenizer/tokenizer.json"})
        var, src = detect_variant(p, None, variant)
        return {"path": p, "family": "diffusers", "component": "pipeline", "variant": var, "variant_source": src,
                "components": comps,
                "size_bytes": sum(c.get("size_bytes", 0) for c in comps.values())}
    if os.path.isdir(p) and not _has_weights(p) and os.path.isfile(os.path.join(p, "tokenizer.json")):
        tok = os.path.join(p, "tokenizer.json")
        return {"path": p, "family": "tokenizer", "component": "tokenizer", "size_bytes": os.path.getsize(tok)}
    source = open_source(p)
    try:
        det = detect(source.keys())
        info = {"path": p, "origin": source.origin, "component": det.component,
                "tensors": len(source.keys()), "files": len(source.files),
                "size_bytes": sum(f.size for f in source.files), "dtypes": _dtype_summary(source),
                "metadata_keys": sorted(source.metadata)}
        if det.component is None:
            info.update(family="unknown", looks_like=det.description)
            return info
        src = strip_prefix(source, det.prefix)
        info["prefix"] = det.prefix
        if det.component == "transformer":
            q = quant_layers(src, "transformer")
            info["family"] = dit_family(src, q)
            info["quantized_layers"] = len(q)
            cfg = src.config or dit_config_from_shapes(src)
            info["layers"] = cfg.get("num_layers")
            info["variant"], info["variant_source"] = detect_variant(p, src, variant)
        elif det.component == "text_encoder":
            info["family"] = te_family(src)
            info["embedded_tokenizer"] = "tokenizer_json" in src
            info["quantized_layers"] = len(quant_layers(src, "text_encoder"))
        else:
            info["family"] = ("diffusers-vae" if src.config is not None else "vae-diffusers") \
                if det.scheme == "diffusers" else "vae-bfl"
        return info
    finally:
        source.close()


def format_inspect(info: dict, indent: str = "") -> str:
    """Human-readable lines for :func:`inspect` output."""
    lines = []
    for k, v in info.items():
        if k == "components":
            lines.append(f"{indent}components:")
            for name, sub in v.items():
                lines.append(f"{indent}  {name}:")
                lines.append(format_inspect(sub, indent + "    "))
        elif k == "size_bytes":
            lines.append(f"{indent}size: {v / 1e9:.3f} GB ({v} bytes)")
        else:
            lines.append(f"{indent}{k}: {v}")
    return "\n".join(lines)
