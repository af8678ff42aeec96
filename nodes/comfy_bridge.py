"""Former single bridge module, kept as an alias of :mod:`nodes.bridge` (split by concern, see its docstring) so
that code written against ``from . import comfy_bridge as bridge`` keeps working. New code: ``from . import
bridge``. To be removed once no branch imports it."""
import sys

from . import bridge

sys.modules[__name__] = bridge
