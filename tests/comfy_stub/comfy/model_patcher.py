"""Stand-in of comfy.model_patcher.ModelPatcher (constructor and the attributes the pack reads)."""
from . import model_management


def _copy_dicts(d):
    """Nested dicts copied, lists shallow-copied, other values shared (ComfyUI's model_options clone)."""
    return {k: _copy_dicts(v) if isinstance(v, dict) else v[:] if isinstance(v, list) else v for k, v in d.items()}


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        self.size = size
        self.model = model
        if getattr(model, "device", None) is None:
            model.device = offload_device
        self.load_device = load_device
        self.offload_device = offload_device
        self.weight_inplace_update = weight_inplace_update
        self.patches = {}
        self.object_patches = {}
        self.weight_wrapper_patches = {}
        self.model_options = {"transformer_options": {}}
        if not hasattr(model, "model_loaded_weight_memory"):
            model.model_loaded_weight_memory = 0
        self.model_size()

    def is_dynamic(self):
        return False

    def model_size(self):
        if self.size > 0:
            return self.size
        self.size = model_management.module_size(self.model)
        return self.size

    def loaded_size(self):
        return self.model.model_loaded_weight_memory

    def clone(self, disable_dynamic=False, model_override=None, force_deepcopy=False):
        n = self.__class__(self.model, self.load_device, self.offload_device, self.size,
                           weight_inplace_update=self.weight_inplace_update)
        n.patches = {k: v[:] for k, v in self.patches.items()}
        n.object_patches = self.object_patches.copy()
        n.model_options = _copy_dicts(self.model_options)
        n.weight_wrapper_patches = self.weight_wrapper_patches.copy()
        return n

    def set_model_sampler_cfg_function(self, sampler_cfg_function, disable_cfg1_optimization=False):
        self.model_options["sampler_cfg_function"] = sampler_cfg_function
        if disable_cfg1_optimization:
            self.model_options["disable_cfg1_optimization"] = True

    def add_weight_wrapper(self, name, function):
        """Records the function (ComfyUI appends these to the module's weight_function when it loads it)."""
        self.weight_wrapper_patches[name] = self.weight_wrapper_patches.get(name, []) + [function]

    def add_object_patch(self, name, obj):
        self.object_patches[name] = obj

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        """Records (strength_patch, patch, strength_model, offset, function) per existing state-dict key, as
        ComfyUI does; the stand-in never applies them."""
        keys = set(self.model.state_dict())
        added = []
        for k, patch in patches.items():
            key, offset, function = (k, None, None) if isinstance(k, str) else (k[0], k[1], k[2] if len(k) > 2 else None)
            if key in keys:
                added.append(k)
                self.patches.setdefault(key, []).append((strength_patch, patch, strength_model, offset, function))
        return added

    def is_clone(self, other):
        return hasattr(other, "model") and self.model is other.model

    def model_dtype(self):
        if hasattr(self.model, "get_dtype"):
            return self.model.get_dtype()

    def current_loaded_device(self):
        return self.model.device


# ComfyUI >= 0.9 picks its patcher class through this name (ModelPatcherDynamic when dynamic VRAM is enabled)
CoreModelPatcher = ModelPatcher
