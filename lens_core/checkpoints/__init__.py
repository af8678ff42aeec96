"""Checkpoint families: detection, key mapping, cast-on-read loading, ``inspect``.

Layout of this package (the public names are re-exported here, so ``from lens_core.checkpoints import …``
is the interface): ``errors`` (:class:`CheckpointError`), ``weightfile`` (:class:`WeightFile`, the interface of
one weight file) with one sibling per container (``safetensors``: :class:`SafetensorsFile`, ``gguf``:
:class:`GGUFFile`), ``locate`` (:func:`locate`: where a component / its tokenizer is, for every path a user
can give, and :func:`open_weight_file`, which picks the container by content), ``source`` (a located file or
shard index as one renamed tensor set), ``detect`` (component, family,
quantization markers, variant), ``assign`` (meta construction + per-tensor assignment), one loader module per
component (``transformer``, ``text_encoder``, ``vae``, ``tokenizer``) and ``inspection``.

Facts: ../shared/docs/checkpoint_formats.md (families §0, shards §1.2, Comfy DiT files §2, NVFP4 encoder §3,
VAE schemes §4, loader checklist §6) and lens_dit_spec.md §1-2.

Accepted inputs, for every component: a single ``.safetensors`` file, a shard index ``*.safetensors.index.json``,
a component folder (``transformer/``, ``text_encoder/``, ``vae/``, ``tokenizer/``) or a whole diffusers folder
(``model_index.json``). The family and the component are detected from the tensor names (never from the file
name); known prefixes (``model.diffusion_model.``, ``transformer.``, ``vae.`` …) are found from the signature
keys and stripped. Files that are something else (a VAE given as DiT, SD / FLUX.1 checkpoints, pickles,
truncated files …) raise :class:`CheckpointError` naming the file and what it looks like.

Safety (issue 12): every header is validated as strictly as the reference ``safetensors`` library before any
tensor byte is used (:func:`.safetensors.parse_header`); shard indexes may only name files inside their folder;
configs are checked for type, range and finiteness and against the tensors present before a module is built.

Memory: tensors are read in file order with positioned reads (no memory map: a map turns a file that shrinks
while it is read into a SIGBUS that kills the process; reads turn it into a :class:`CheckpointError`), each
straight into its final tensor (same dtype on CPU) or through one 16 MB staging buffer (cast / other device),
and assigned to a module built with its parameters on the ``meta`` device, so peak RSS ≈ the resident weights +
one tensor (fp32 16.4 GB DiT → 8.2 GB bf16; BENCHMARKS.md "Loading").

Time: :mod:`lens_core.readahead` runs a helper thread that asks the kernel to read the next 256 MB of the file
into the page cache (``posix_fadvise(WILLNEED)``) while this thread copies/casts, so disk reading overlaps the
CPU work (BENCHMARKS.md "Loading", run 9 for the positioned reads; runs 5-8 were the earlier memory map).
"""
from __future__ import annotations

from .errors import CheckpointError
from .weightfile import ST_DTYPES, ST_NAMES, TensorEntry, WeightFile
from .safetensors import PICKLE_SUFFIXES, SafetensorsFile
from .gguf import GGUFFile
from .locate import (COMPONENT_DIRS, Location, folder_kind, is_diffusers_root, is_weight_file_name, locate,
                     open_weight_file)
from .source import DictSource, TensorSource, open_component_folder, open_location, open_source
from .detect import (COMPONENT_NAMES, DIT_SIGNATURE, FOREIGN, NVFP4_TE_SUFFIX, TE_SIGNATURE,
                     VAE_BFL_SIGNATURE, VAE_DIFFUSERS_SIGNATURE, Detection, detect, detect_variant, dit_family,
                     quant_layers, strip_prefix, te_family)
from .tokenizer import load_tokenizer
from .inspection import format_inspect, inspect

# The loaders (and what they need: torch, the model modules) are imported on first use, so that ``inspect`` and
# header checks never import PyTorch (the CLI's ``inspect`` runs without it).
_LAZY = {
    "IGNORED_KEYS": "assign", "CheckpointInfo": "assign", "assign_weights": "assign",
    "init_empty_weights": "assign", "dit_config_from_shapes": "transformer", "load_transformer": "transformer",
    "REAL_SELECTED_LAYERS": "text_encoder", "REAL_TE_CONFIG": "text_encoder", "load_text_encoder": "text_encoder",
    "load_text_encoder_parts": "text_encoder", "te_config_from_shapes": "text_encoder", "load_vae": "vae",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value          # later look-ups (and monkeypatching in tests) see a plain attribute
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "CheckpointError", "PICKLE_SUFFIXES", "ST_DTYPES", "ST_NAMES", "SafetensorsFile", "GGUFFile", "TensorEntry",
    "WeightFile", "COMPONENT_DIRS", "Location", "folder_kind", "is_diffusers_root", "is_weight_file_name", "locate",
    "open_weight_file", "DictSource", "TensorSource", "open_component_folder", "open_location", "open_source",
    "COMPONENT_NAMES", "DIT_SIGNATURE", "FOREIGN", "NVFP4_TE_SUFFIX", "TE_SIGNATURE",
    "VAE_BFL_SIGNATURE", "VAE_DIFFUSERS_SIGNATURE", "Detection", "detect", "detect_variant", "dit_family",
    "quant_layers", "strip_prefix", "te_family", "IGNORED_KEYS", "CheckpointInfo", "assign_weights",
    "init_empty_weights", "dit_config_from_shapes", "load_transformer", "REAL_SELECTED_LAYERS", "REAL_TE_CONFIG",
    "load_text_encoder", "load_text_encoder_parts", "te_config_from_shapes", "load_vae", "load_tokenizer", "format_inspect", "inspect",
]
