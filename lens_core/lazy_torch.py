"""``torch``, imported on first use: for the modules that ``inspect`` and the CLI's argument checks need (header
parsing, detection, configs), so that those never pay the seconds ``import torch`` takes.

``from .lazy_torch import torch`` gives an object whose attributes are those of the real ``torch`` module,
which is imported the first time any attribute is read. Only for modules that use torch inside functions: a
module that touches torch when it is imported (decorators, default arguments, subclasses of ``nn.Module``)
imports it at once and gains nothing.
"""
from __future__ import annotations

import importlib
import sys
import types


class LazyModule(types.ModuleType):
    """A module imported the first time one of its attributes is read."""

    def __getattr__(self, attr):
        module = sys.modules.get(self.__name__) or importlib.import_module(self.__name__)
        if module is self:      # pragma: no cover - never registered in sys.modules
            raise AttributeError(attr)
        return getattr(module, attr)


torch = LazyModule("torch")
