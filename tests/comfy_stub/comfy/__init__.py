"""Minimal stand-in of the ``comfy`` package for CI tests (see tests/comfy_stub/README.md)."""
