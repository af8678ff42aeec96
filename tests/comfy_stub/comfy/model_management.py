"""Stand-in of comfy.model_management on a CPU-only machine (signatures of ComfyUI 0.3.64).

Models are "loaded" by keeping them in ``current_loaded_models``; every ``load_models_gpu`` call is recorded
in ``LOAD_CALLS`` as ``(patchers, memory_required, minimum_memory_required)``.
"""
import threading

import torch

from .cli_args import args

current_loaded_models = []
LOAD_CALLS = []


class InterruptProcessingException(Exception):
    pass


interrupt_processing_mutex = threading.RLock()
interrupt_processing = False


def get_torch_device():
    return torch.device("cpu")


def unet_offload_device():
    return torch.device("cpu")


def text_encoder_device():
    return torch.device("cpu")


def text_encoder_offload_device():
    return torch.device("cpu")


def vae_device():
    return torch.device("cpu")


def vae_offload_device():
    return torch.device("cpu")


def intermediate_device():
    return torch.device("cpu")


def unet_dtype(device=None, model_params=0, supported_dtypes=[torch.float16, torch.bfloat16, torch.float32],
               weight_dtype=None):
    return torch.float32


def text_encoder_dtype(device=None):
    return torch.float16


def vae_dtype(device=None, allowed_dtypes=[]):
    return torch.float32


def module_size(module):
    return sum(t.nelement() * t.element_size() for t in module.state_dict().values())


def get_free_memory(dev=None, torch_free_too=False):
    import os  # real ComfyUI asks psutil for the available RAM on the CPU
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return (free, free) if torch_free_too else free


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                    force_full_load=False):
    LOAD_CALLS.append((list(models), memory_required, minimum_memory_required))
    for m in models:
        if m not in current_loaded_models:
            current_loaded_models.insert(0, m)
        m.model.model_loaded_weight_memory = m.model_size()


def load_model_gpu(model):
    return load_models_gpu([model])


def loaded_models(only_currently_used=False):
    return list(current_loaded_models)


def free_memory(memory_required, device, keep_loaded=[], for_dynamic=False, pins_required=0, ram_required=0):
    """Unloads every model on ``device`` not in ``keep_loaded`` (compared by ``.model``, as ComfyUI's loaded-model
    wrappers compare); returns the unloaded patchers."""
    kept = [k.model for k in keep_loaded]
    out = [m for m in current_loaded_models if m.load_device == device and not any(m is k for k in kept)]
    current_loaded_models[:] = [m for m in current_loaded_models if not any(m is o for o in out)]
    return out


def unload_all_models():
    current_loaded_models.clear()


def soft_empty_cache(force=False):
    pass


def interrupt_current_processing(value=True):
    global interrupt_processing
    with interrupt_processing_mutex:
        interrupt_processing = value


def processing_interrupted():
    with interrupt_processing_mutex:
        return interrupt_processing


def throw_exception_if_processing_interrupted():
    global interrupt_processing
    with interrupt_processing_mutex:
        if interrupt_processing:
            interrupt_processing = False
            raise InterruptProcessingException()


def cast_to_device(tensor, device, dtype, copy=False):
    return tensor.to(device=device, dtype=dtype, copy=copy)
