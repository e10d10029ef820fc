"""scripts/learning_curves.py keeps working: its whole code path (ablation rows, the two-corpus comparison, step-time
ratios, report and plots) on a few steps of a tiny shape. Bits/byte values and speeds are never asserted here."""

import importlib.util
import json
import sys

import pytest
from helpers import ROOT


def script():
    spec = importlib.util.spec_from_file_location("learning_curves", ROOT / "scripts" / "learning_curves.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_ablation_starts_at_the_gpt2_preset_and_ends_at_the_modern_one():
    lc = script()
    gpt2, _ = lc.read_preset(lc.GPT2_PRESET)
    modern, _ = lc.read_preset(lc.MODERN_PRESET)
    rows = lc.ablation(gpt2)
    assert rows[0][1] == gpt2
    names = [name for name, _ in rows]
    assert len(names) == len(set(names)) and len(rows) >= 10
    # The preset and the tiny preset share the shape and the data, so the comparison is at equal tokens.
    assert (modern.backbone.width, modern.backbone.depth, modern.backbone.heads) == (192, 4, 6)


@pytest.mark.slow
def test_the_script_writes_the_tables_and_plots(tmp_path):
    lc = script()
    out, raw = tmp_path / "docs", tmp_path / "results.json"
    argv = ["--steps", "2", "--eval-every", "1", "--rows", "0", "1", "--time-rounds", "1", "--time-steps", "1",
            "--width", "16", "--depth", "1", "--heads", "2", "--block-size", "16", "--batch-size", "2",
            "--bpe-vocab-size", "300", "--out", str(out), "--json", str(raw),
            "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    assert lc.main(argv) == 0
    text = (out / "learning.md").read_text()
    assert "| GPT-2 recipe (tiny.yaml at fp32) |" in text and "| + rotary positions |" in text
    assert "| builtin |" in text and "| wordnet |" in text
    for name in ("learning-tokens.png", "learning-seconds.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The report can be rewritten from the raw results alone (runs split over processes are merged this way).
    (out / "learning.md").unlink()
    assert lc.main(["--from-json", str(raw), "--out", str(out)]) == 0
    assert (out / "learning.md").read_text() == text
    # Built-in: rows 0 (the GPT-2 recipe, not trained twice) and 1, the modern recipe; WordNet glosses: both recipes.
    assert len(json.loads(raw.read_text())["curves"]) == 3 + 2
