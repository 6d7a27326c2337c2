"""llava-kv's benchmark suite: ``python -m benchmarks --preset tiny|realistic --out DIR`` from the repo
root (see benchmarks/README.md). Not part of the installed package."""
