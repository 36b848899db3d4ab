"""Benchmarks for histod (not part of the test suite). Run each from the repository root, e.g.
``.venv/bin/python -m bench.inference --run RUN_DIR``; see bench/README.md."""
