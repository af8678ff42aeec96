"""Benchmark of the 'dit' component (to be filled in by its issue)."""


def add_arguments(parser):
    pass


def run(args):
    raise SystemExit("the 'dit' benchmark is not implemented yet")
