"""Stand-in of comfy.model_patcher.ModelPatcher (constructor and the attributes the pack reads)."""
from . import model_management


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

    def clone(self):
        return self.__class__(self.model, self.load_device, self.offload_device, self.size,
                              weight_inplace_update=self.weight_inplace_update)

    def is_clone(self, other):
        return hasattr(other, "model") and self.model is other.model

    def model_dtype(self):
        if hasattr(self.model, "get_dtype"):
            return self.model.get_dtype()

    def current_loaded_device(self):
        return self.model.device


# ComfyUI >= 0.9 picks its patcher class through this name (ModelPatcherDynamic when dynamic VRAM is enabled)
CoreModelPatcher = ModelPatcher
