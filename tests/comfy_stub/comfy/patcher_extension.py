"""Stand-in of comfy.patcher_extension: wrapper types and the executor that runs a wrapper chain around a
function (each wrapper gets the executor, which calls the next one, then the function)."""


class WrappersMP:
    OUTER_SAMPLE = "outer_sample"
    CALC_COND_BATCH = "calc_cond_batch"
    APPLY_MODEL = "apply_model"
    DIFFUSION_MODEL = "diffusion_model"


def get_all_wrappers(wrapper_type, transformer_options, is_model_options=False):
    if is_model_options:
        transformer_options = transformer_options.get("transformer_options", {})
    out = []
    for w in transformer_options.get("wrappers", {}).get(wrapper_type, {}).values():
        out.extend(w)
    return out


class WrapperExecutor:
    def __init__(self, original, class_obj, wrappers, idx):
        self.original, self.class_obj, self.wrappers, self.idx = original, class_obj, wrappers.copy(), idx
        self.is_last = idx == len(wrappers)

    def __call__(self, *args, **kwargs):
        return self.execute(*args, **kwargs)

    def execute(self, *args, **kwargs):
        if self.is_last:
            return self.original(*args, **kwargs)
        nxt = WrapperExecutor(self.original, self.class_obj, self.wrappers, self.idx + 1)
        return self.wrappers[self.idx](nxt, *args, **kwargs)

    @classmethod
    def new_executor(cls, original, wrappers, idx=0):
        return cls(original, None, wrappers, idx)

    @classmethod
    def new_class_executor(cls, original, class_obj, wrappers, idx=0):
        return cls(original, class_obj, wrappers, idx)
