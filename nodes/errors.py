"""Errors as ComfyUI's UI shows them: one readable line.

ComfyUI reports a failed node as ``<exception type>: <message>``, the type being the class's full module path for
anything but a builtin (a LoRA error read ``custom_nodes.lens-nodes.lens_core.lora.LoraError: …``). The pack's
own error classes (CheckpointError, LoraError, …) all derive from ValueError/OSError; at the node boundary they
are re-raised as that builtin with the same message on one line (the original stays attached as ``__cause__``
for the console's traceback). Builtin exceptions and ComfyUI's own (interrupts, out-of-memory) pass unchanged.
"""
from __future__ import annotations

import functools


def _pack_root() -> str:
    return __name__.rsplit(".", 2)[0]           # "<pack>.nodes.errors" -> "<pack>"


def readable(exc: BaseException) -> BaseException | None:
    """The builtin exception to raise instead of ``exc`` (a pack error class), or None to keep ``exc``."""
    if not type(exc).__module__.startswith(_pack_root() + "."):
        return None
    base = next((c for c in type(exc).__mro__ if c.__module__ == "builtins" and issubclass(c, Exception)), None)
    if base is None or base is Exception:
        base = RuntimeError
    message = " ".join(str(exc).split()) if "\n" in str(exc) else str(exc)
    try:
        out = base(message)
    except TypeError:
        out = RuntimeError(message)
    return out


def with_readable_errors(cls):
    """Wrap ``cls``'s ComfyUI entry point (``cls.FUNCTION``) so that pack errors reach the UI as builtins."""
    name = cls.FUNCTION
    func = getattr(cls, name)
    if getattr(func, "_lens_readable", False):
        return cls

    @functools.wraps(func)
    def run(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except Exception as exc:
            plain = readable(exc)
            if plain is None:
                raise
            raise plain from exc

    run._lens_readable = True
    setattr(cls, name, run)
    return cls

