"""The parity matrix on CPU: every task x every scale-out setting against the 1-process fp32 run on the same global
batch (loss per step, final weights, optimizer groups, logged gradient norm, learning rate). What is compared and
the tolerances are in `polyformer.parity`; this module runs the matrix once per session and asserts each cell."""

from __future__ import annotations

import pytest

from polyformer import parity
from polyformer.parity import SETTINGS, STEPS, TASKS, not_applicable

CELLS = [(t, s) for t in TASKS for s in SETTINGS if not not_applicable(t, SETTINGS[s])]


@pytest.fixture(scope="session")
def matrix(tmp_path_factory):
    out = tmp_path_factory.mktemp("parity")
    env = {"POLYFORMER_CACHE": str(out / "cache")}  # tokenizers and token arrays built once
    failures = parity.matrix(out, list(SETTINGS.values()), list(TASKS), "cpu", STEPS, env=env)
    cells = parity.compare(out, list(SETTINGS.values()), list(TASKS), STEPS)
    print("\n" + parity.table(cells, list(SETTINGS.values())))
    return {(c.task, c.setting): c for c in cells}, failures


@pytest.mark.slow
@pytest.mark.timeout(2400)  # the first cell runs the whole matrix (~6.5 min on 2 idle cores, compile half of it)
@pytest.mark.parametrize("task,setting", CELLS, ids=[f"{t}-{s}" for t, s in CELLS])
def test_setting_trains_the_reference_model(task, setting, matrix):
    cells, failures = matrix
    assert "reference" not in failures, f"the reference run failed:\n{failures['reference']}"
    assert setting not in failures, f"the {setting} runs failed:\n{failures[setting]}"
    cell = cells[(task, setting)]
    print(f"{task} / {setting}: {cell.status} {cell.measured} {cell.note}")
    assert cell.status == "pass", f"{task} under {setting} trains another model than the reference: {cell.note}"


def test_cells_left_out_are_exactly_the_documented_ones():
    left_out = {
        (t, s): not_applicable(t, SETTINGS[s]) for t in TASKS for s in SETTINGS if not_applicable(t, SETTINGS[s])
    }
    assert set(left_out) == {
        ("clip", "accumulation"),  # fewer negatives per loss: another objective
        ("translation", "accumulation"),  # is the translation reference
        ("lm", "resume-workers"),  # in-process loading: no workers to resume with
        ("translation", "resume-workers"),
        # Muon: only where the optimizer's inputs differ from one process's (ranks, shards, accumulation, resume)
        *(("lm-muon", s) for s in SETTINGS if s not in parity.OPTIMIZER_SETTINGS),
        # SigLIP: only where its loss exchanges texts across ranks
        *(("clip-siglip", s) for s in SETTINGS if s not in ("ddp", "fsdp")),
        # BERT's masked LM: where its per-sample masks meet ranks, resume and loader workers
        *(("bert-mlm", s) for s in SETTINGS if s not in ("ddp", "resume", "resume-workers")),
    }, left_out
    assert len(CELLS) == len(TASKS) * len(SETTINGS) - len(left_out)


def test_gpu_script_says_what_to_run_without_a_gpu(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: scripts/parity.py would run the whole GPU matrix")
    script = Path(__file__).resolve().parents[2] / "scripts" / "parity.py"
    proc = subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "python -m polyformer.parity matrix" in proc.stderr, proc.stderr
