"""Benchmark of the 'pipeline' component (to be filled in by its issue)."""


def add_arguments(parser):
    pass


def run(args):
    raise SystemExit("the 'pipeline' benchmark is not implemented yet")
