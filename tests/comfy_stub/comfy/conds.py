"""Stand-in of comfy.conds.CONDRegular (a conditioning tensor ComfyUI batches as is)."""


class CONDRegular:
    def __init__(self, cond):
        self.cond = cond

    def process_cond(self, batch_size, **kwargs):
        return self.__class__(self.cond)
