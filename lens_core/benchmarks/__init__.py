"""One module per benchmarked component; see lens_core/bench.py."""
