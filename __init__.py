"""ComfyUI entry point of lens-nodes: registers the Lens nodes (classic NODE_CLASS_MAPPINGS API)."""
if not __package__:
    # Imported as a plain module, not as a package: pytest collecting a clone whose folder name is not a Python
    # identifier (e.g. ``git clone … lens-nodes``). ComfyUI always imports a pack as a package.
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}
else:
    try:
        from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    except ModuleNotFoundError as exc:
        # Imported outside ComfyUI (e.g. pytest collecting the repository root as a package): there is no
        # ``comfy`` to build nodes on, so register none. Inside ComfyUI ``comfy`` always exists and any other
        # import error propagates (ComfyUI then logs "IMPORT FAILED" for the pack).
        if exc.name not in ("comfy", "folder_paths"):
            raise
        NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

# UI helpers (web/lens_nodes.js: LensEmptyLatent shows the size its preset uses)
WEB_DIRECTORY = "./web"
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
