"""Speed benchmark against the reference implementations, and the golden loss curves.

Nothing here is imported by the platform itself: `scripts/benchmark.py` and `scripts/golden_curves.py` drive it,
and the peers (transformers, timm, open_clip) are only imported when a benchmark needs them (the `[bench]` extra).
"""
