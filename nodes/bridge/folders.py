"""Model folders: single files (ComfyUI's folder_paths folders) and diffusers folders found below the same
folders, listed loop-safely (ComfyUI's own recursive listing follows symlink loops without end)."""
from __future__ import annotations

import os

import folder_paths

DIFFUSERS_MARKER = "model_index.json"
MAX_LISTING_DEPTH = 12
MODEL_EXTENSIONS = (".safetensors", ".sft", ".gguf")


def folder_roots(folder: str) -> list[str]:
    """The directories ComfyUI has registered for ``folder`` (none for an unknown folder name)."""
    try:
        return folder_paths.get_folder_paths(folder)
    except KeyError:
        return []


def walk(root: str):
    """(relative dir, subdir names, file names) below ``root``, following symlinks but entering every real folder
    once (symlink loops and repeated links are skipped) and at most MAX_LISTING_DEPTH levels deep; unreadable
    folders are skipped. Termination does not depend on the folder's contents."""
    seen = set()
    stack = [("", 0)]
    while stack:
        rel, depth = stack.pop()
        cur = os.path.join(root, rel) if rel else root
        try:
            st = os.stat(cur)
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            with os.scandir(cur) as it:
                entries = list(it)
        except OSError:
            continue
        dirs, files = [], []
        for e in entries:
            try:
                (dirs if e.is_dir() else files if e.is_file() else []).append(e.name)
            except OSError:
                continue
        dirs = sorted(d for d in dirs if not d.startswith("."))
        yield rel, dirs, sorted(files)
        if depth < MAX_LISTING_DEPTH:
            stack.extend((f"{rel}/{d}" if rel else d, depth + 1) for d in reversed(dirs))


def _listing(folder: str, extensions=MODEL_EXTENSIONS, diffusers: bool = True) -> tuple[list[str], list[str]]:
    """(diffusers folders, loose files ending in ``extensions``) below ``folder``'s roots, as relative '/' paths.

    With ``diffusers``, pipeline roots (model_index.json) and stand-alone component folders (config.json next to
    *.safetensors) are listed as folders and their own shards and sub-components are not listed as files."""
    folders, files = set(), []
    for root in folder_roots(folder):
        if not os.path.isdir(root):
            continue
        inside = []                    # folders already taken as diffusers folders (skip what is below them)
        for rel, _dirs, names in walk(root):
            if any(rel == d or rel.startswith(d + "/") for d in inside):
                continue
            is_pipeline = DIFFUSERS_MARKER in names
            is_component = "config.json" in names and any(n.endswith(".safetensors") for n in names)
            if diffusers and (is_pipeline or is_component) and rel:
                folders.add(rel)
                inside.append(rel)
                continue
            files += [f"{rel}/{n}" if rel else n for n in names if n.lower().endswith(extensions)]
    return sorted(folders), sorted(set(files))


def model_folders(folder: str) -> list[str]:
    """Relative paths of diffusers folders below ``folder``'s roots (see :func:`_listing`)."""
    return _listing(folder)[0]


def model_files(folder: str, extensions=MODEL_EXTENSIONS, diffusers: bool = True) -> list[str]:
    """Files of ``folder`` ending in ``extensions`` (default: safetensors and GGUF, which ComfyUI's own filename
    lists leave out), without the files of diffusers folders unless ``diffusers`` is False."""
    return _listing(folder, extensions, diffusers)[1]


def model_choices(*folders: str, files: bool = True, dirs: bool = True, dir_folders: tuple = ()) -> list[str]:
    """Combo entries: files of ``folders`` and diffusers folders of ``folders + dir_folders``."""
    out = []
    for f in folders:
        if files:
            out += model_files(f)
    if dirs:
        for f in tuple(folders) + tuple(dir_folders):
            out += [d for d in model_folders(f) if d not in out]
    return out or ["(no Lens files found)"]


def resolve_model(name: str, *folders: str) -> str:
    """Absolute path of a combo entry (file or folder) searched in ``folders``; FileNotFoundError naming
    the folders searched otherwise."""
    for folder in folders:
        for root in folder_roots(folder):     # folders first: get_full_path warns about symlinked folders
            cand = os.path.join(root, os.path.relpath(os.path.join(os.sep, name), os.sep))
            if os.path.isdir(cand):
                return cand
        p = folder_paths.get_full_path(folder, name)
        if p is not None:
            return p
    searched = [r for f in folders for r in folder_roots(f)]
    raise FileNotFoundError(f"{name!r} not found: expected a file or diffusers folder in {searched}; "
                            f"put the model there (see the README table) and refresh the node list")


def component_path(path: str, component: str) -> str:
    """``path/component`` when ``path`` is a diffusers pipeline root that has that component."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, DIFFUSERS_MARKER)):
        sub = os.path.join(path, component)
        if not os.path.isdir(sub):
            raise FileNotFoundError(f"{path} is a diffusers pipeline folder without a {component}/ folder; "
                                    f"expected {sub}")
        return sub
    return path
