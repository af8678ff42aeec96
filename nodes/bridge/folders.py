"""Model folders: single files (ComfyUI's folder_paths folders) and diffusers folders found below the same
folders, listed loop-safely (ComfyUI's own recursive listing follows symlink loops without end). A folder's
listing is read again only when one of the directories walked changed (their mtimes, as ComfyUI's own filename
cache checks): node lists are built on every /object_info and every executed node."""
from __future__ import annotations

import os
import time

import folder_paths

from ...lens_core.checkpoints.locate import DIFFUSERS_MARKER, WEIGHT_SUFFIXES, folder_kind

MAX_LISTING_DEPTH = 12
MODEL_EXTENSIONS = WEIGHT_SUFFIXES          # what lens_core's locate() opens (safetensors, GGUF)
# A directory changed less than this long before its walk began is walked again next time: an entry added within
# the same filesystem timestamp tick would leave its mtime unchanged.
SETTLED_NS = 2_000_000_000
_WALK_CACHE: dict = {}                      # root -> ({directory walked: (mtime_ns, ctime_ns)}, walk entries)
_WALK_CACHE_SIZE = 64


def folder_roots(folder: str) -> list[str]:
    """The directories ComfyUI has registered for ``folder`` (none for an unknown folder name)."""
    try:
        return folder_paths.get_folder_paths(folder)
    except KeyError:
        return []


def _stamp(path: str):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_ctime_ns


def walk(root: str, stamps: dict | None = None):
    """(relative dir, subdir names, file names) below ``root``, following symlinks but entering every real folder
    once (symlink loops and repeated links are skipped) and at most MAX_LISTING_DEPTH levels deep; unreadable
    folders are skipped. Termination does not depend on the folder's contents. ``stamps`` receives the
    (mtime_ns, ctime_ns) of every directory entered, by path."""
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
            if stamps is not None:
                stamps[cur] = (st.st_mtime_ns, st.st_ctime_ns)
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


def _walk_cached(root: str) -> list:
    """``list(walk(root))``, walked again only when a directory walked last time changed (or is gone)."""
    hit = _WALK_CACHE.get(root)
    if hit is not None and all(_stamp(d) == s for d, s in hit[0].items()):
        return hit[1]
    start, stamps = time.time_ns(), {}
    entries = list(walk(root, stamps))
    _WALK_CACHE.pop(root, None)
    if stamps and all(m < start - SETTLED_NS for m, _c in stamps.values()):
        while len(_WALK_CACHE) >= _WALK_CACHE_SIZE:
            _WALK_CACHE.pop(next(iter(_WALK_CACHE)))
        _WALK_CACHE[root] = (stamps, entries)
    return entries


def _listing(folder: str, extensions=MODEL_EXTENSIONS, diffusers: bool = True) -> tuple[list[str], list[str]]:
    """(diffusers folders, loose files ending in ``extensions``) below ``folder``'s roots, as relative '/' paths.

    With ``diffusers``, the folders lens_core's ``locate()`` opens as one model (``folder_kind``: pipeline roots
    with model_index.json; component folders: a shard index, or config.json next to weights) are listed as
    folders and their own shards and sub-components are not listed as files."""
    folders, files = set(), []
    for root in folder_roots(folder):
        if not os.path.isdir(root):
            continue
        inside = []                    # folders already taken as diffusers folders (skip what is below them)
        for rel, _dirs, names in _walk_cached(root):
            if any(rel == d or rel.startswith(d + "/") for d in inside):
                continue
            if diffusers and rel and folder_kind(names) is not None:
                folders.add(rel)
                inside.append(rel)
                continue
            files += [f"{rel}/{n}" if rel else n for n in names if n.lower().endswith(extensions)]
    return sorted(folders), sorted(set(files))


def model_files(folder: str, extensions=MODEL_EXTENSIONS, diffusers: bool = True) -> list[str]:
    """Files of ``folder`` ending in ``extensions`` (default: safetensors and GGUF, which ComfyUI's own filename
    lists leave out), without the files of diffusers folders unless ``diffusers`` is False."""
    return _listing(folder, extensions, diffusers)[1]


def model_choices(*folders: str, files: bool = True, dirs: bool = True, dir_folders: tuple = ()) -> list[str]:
    """Combo entries: files of ``folders`` and diffusers folders of ``folders + dir_folders`` (each folder
    listed once)."""
    listings = {f: _listing(f) for f in dict.fromkeys(tuple(folders) + tuple(dir_folders))}
    out = []
    for f in folders:
        if files:
            out += listings[f][1]
    if dirs:
        for f in tuple(folders) + tuple(dir_folders):
            out += [d for d in listings[f][0] if d not in out]
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
