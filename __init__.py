"""ComfyUI entry point of lens-nodes: registers the Lens nodes (classic NODE_CLASS_MAPPINGS API)."""
try:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ModuleNotFoundError as exc:
    # Imported outside ComfyUI (e.g. pytest collecting the repository root as a package): there is no
    # ``comfy`` to build nodes on, so register none. Inside ComfyUI ``comfy`` always exists and any other
    # import error propagates (ComfyUI then logs "IMPORT FAILED" for the pack).
    if exc.name not in ("comfy", "folder_paths"):
        raise
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

WEB_DIRECTORY = None
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
