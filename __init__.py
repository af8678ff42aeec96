"""ComfyUI entry point of lens-nodes: registers the Lens nodes (classic NODE_CLASS_MAPPINGS API)."""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = None
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
