// lens-nodes UI helpers (loaded by ComfyUI from the pack's WEB_DIRECTORY).
//
// LensEmptyLatent: with an aspect preset the width/height widgets show the size the preset gives (the node uses
// the preset, so the widgets say what is used) and are labelled as coming from it; editing width or height
// switches the node to 'custom'. base_resolution is labelled unused under 'custom'. The bucket table comes from
// the node definition (aspect_ratio's "lens_buckets": {base: {aspect: [width, height]}}), i.e. from lens_core.
import { app } from "../../scripts/app.js";

const CUSTOM = "custom";

function setup(node, buckets) {
  const find = (name) => node.widgets?.find((w) => w.name === name);
  const aspect = find("aspect_ratio"), base = find("base_resolution");
  const width = find("width"), height = find("height");
  if (!aspect || !base || !width || !height || !buckets) return null;
  let syncing = false;

  const sync = () => {
    const size = aspect.value === CUSTOM ? null : buckets[String(base.value)]?.[aspect.value];
    syncing = true;
    try {
      if (size) {
        width.value = size[0];
        height.value = size[1];
      }
      width.label = size ? `width (${aspect.value} preset)` : "width";
      height.label = size ? `height (${aspect.value} preset)` : "height";
      base.label = size ? "base_resolution" : "base_resolution (unused)";
    } finally {
      syncing = false;
    }
    node.setDirtyCanvas?.(true, true);
  };
  const after = (widget, fn) => {
    const original = widget.callback;
    widget.callback = function (...args) {
      const result = original?.apply(this, args);
      fn();
      return result;
    };
  };
  const toCustom = () => {
    if (!syncing && aspect.value !== CUSTOM) {
      aspect.value = CUSTOM;
      sync();
    }
  };
  after(aspect, sync);
  after(base, sync);
  after(width, toCustom);
  after(height, toCustom);
  return sync;
}

app.registerExtension({
  name: "lens-nodes.LensEmptyLatent",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== "LensEmptyLatent") return;
    const buckets = nodeData.input?.required?.aspect_ratio?.[1]?.lens_buckets;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      this.lensSyncSize = setup(this, buckets);
      this.lensSyncSize?.();
      return result;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const result = onConfigure?.apply(this, arguments);
      this.lensSyncSize?.();          // a loaded workflow's values are in place now
      return result;
    };
  },
});
