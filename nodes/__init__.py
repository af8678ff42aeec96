"""ComfyUI node layer of lens-nodes (thin: no maths; everything computes in lens_core)."""
NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
