"""One module per scenario (or per group of scenarios measured together): the measurement of our
side, the calls that start the peers' side (scripts in benchmarks/peers/), and the ``run_*(ctx)``
that turns them into results.json entries (figures, limit, ratios, notes). Each module also runs
alone as a script and prints its JSON. ``vram_release`` runs only alone (it needs a GPU device)."""
