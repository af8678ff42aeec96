"""Stand-in of ComfyUI's folder_paths: model folders under a base directory (``set_models_dir`` for tests)."""
import os

supported_pt_extensions = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
models_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_models")
folder_names_and_paths = {}
_LEGACY = {"unet": "diffusion_models", "clip": "text_encoders"}


def set_models_dir(path):
    """Test helper (not in ComfyUI): point the standard model folders at ``path``."""
    global models_dir
    models_dir = str(path)
    folder_names_and_paths.clear()
    for name in ("diffusion_models", "text_encoders", "vae", "vae_approx", "upscale_models", "checkpoints", "loras"):
        folder_names_and_paths[name] = ([os.path.join(models_dir, name)], set(supported_pt_extensions))


set_models_dir(models_dir)


def map_legacy(folder_name):
    return _LEGACY.get(folder_name, folder_name)


def get_folder_paths(folder_name):
    return folder_names_and_paths[map_legacy(folder_name)][0][:]


def get_filename_list(folder_name):
    folder_name = map_legacy(folder_name)
    dirs, exts = folder_names_and_paths[folder_name]
    out = set()
    for d in dirs:
        if not os.path.isdir(d):
            continue
        for root, subdirs, files in os.walk(d, followlinks=True):
            subdirs[:] = [s for s in subdirs if not s.startswith(".")]
            for f in files:
                if not exts or os.path.splitext(f)[1].lower() in exts:
                    out.add(os.path.relpath(os.path.join(root, f), d).replace(os.sep, "/"))
    return sorted(out)


def get_full_path(folder_name, filename):
    folder_name = map_legacy(folder_name)
    if folder_name not in folder_names_and_paths:
        return None
    for d in folder_names_and_paths[folder_name][0]:
        p = os.path.join(d, os.path.relpath(os.path.join(os.sep, filename), os.sep))
        if os.path.isfile(p) or os.path.islink(p):
            return p
    return None


def get_full_path_or_raise(folder_name, filename):
    p = get_full_path(folder_name, filename)
    if p is None:
        raise FileNotFoundError(f"stand-in folder_paths: no {filename!r} in the {folder_name!r} model folders")
    return p
