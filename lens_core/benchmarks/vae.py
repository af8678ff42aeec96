"""Benchmark of the 'vae' component (to be filled in by its issue)."""


def add_arguments(parser):
    pass


def run(args):
    raise SystemExit("the 'vae' benchmark is not implemented yet")
