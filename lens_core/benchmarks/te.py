"""Benchmark of the 'te' component (to be filled in by its issue)."""


def add_arguments(parser):
    pass


def run(args):
    raise SystemExit("the 'te' benchmark is not implemented yet")
