"""Shared test helpers (importable because pyproject sets pytest's pythonpath to tests/)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_cli(args: list[str], cwd: Path, timeout: int = 600, env: dict | None = None):
    """The CLI as a user runs it: a subprocess of `python -m polyformer`."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "polyformer", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# The LM preset (configs/lm/tiny.yaml) shrunk to seconds: a 1-layer, 32-wide GPT on 4 x 16-token blocks of a 300-token
# BPE, fp32. Append --trainer.max_steps etc. per test.
TINY_LM_ARGS = [
    "--model.init_args.backbone.width=32", "--model.init_args.backbone.depth=1", "--model.init_args.backbone.heads=2",
    "--data.init_args.batch_size=4", "--data.init_args.block_size=16", "--model.init_args.backbone.max_len=64",
    "--data.init_args.bpe_vocab_size=300", "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1",
    "--trainer.precision=32-true", "--model.init_args.samples.max_new_tokens=4",
]  # fmt: skip
