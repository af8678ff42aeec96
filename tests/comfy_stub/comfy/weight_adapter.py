"""Stand-in of comfy.weight_adapter: the LoRA / LoHa / LoKr adapter classes (constructor of ComfyUI 0.33).

The stand-in only records the factors; it never computes a weight (the real ComfyUI does, in the comfyui tests).
"""


class WeightAdapterBase:
    name = "base"


class LoRAAdapter(WeightAdapterBase):
    name = "lora"

    def __init__(self, loaded_keys, weights):
        self.loaded_keys, self.weights = loaded_keys, weights


class LoHaAdapter(WeightAdapterBase):
    name = "loha"

    def __init__(self, loaded_keys, weights):
        self.loaded_keys, self.weights = loaded_keys, weights


class LoKrAdapter(WeightAdapterBase):
    name = "lokr"

    def __init__(self, loaded_keys, weights):
        self.loaded_keys, self.weights = loaded_keys, weights
