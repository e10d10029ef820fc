"""Speed benchmark of polyformer against the reference implementations (transformers, timm, torch, open_clip).

A top-level folder, not part of the installed package: `polyformer` never imports it, and it imports `polyformer`
for everything it measures of ours (models, losses, FLOP counts). `scripts/benchmark.py` drives it; the peers are
only imported when a benchmark needs them (the `[bench]` extra). Modules depend one way: timing <- models <-
generation, data; report holds the rows and renders them; run builds, times and reports.
"""
