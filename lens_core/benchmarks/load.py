"""Benchmark of the 'load' component (to be filled in by its issue)."""


def add_arguments(parser):
    pass


def run(args):
    raise SystemExit("the 'load' benchmark is not implemented yet")
