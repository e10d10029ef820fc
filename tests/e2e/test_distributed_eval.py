"""Exact distributed evaluation: the same checkpoint evaluated by 1 process and by 2 DDP processes gives the same
metrics, because every evaluation sample is scored exactly once across ranks (no padding duplicates, no rank-0-only
shortcuts, sums rather than means of per-rank means). The split sizes are odd or leave ranks uneven batches, so a
padding sampler or an unweighted mean of per-rank means would show up as a difference."""

from __future__ import annotations

import json
import math

import pytest
from e2e.scaleout import polyformer, probe_args, task_args

# The LM has no test split; the others are scored on their test split.
CASES = {
    "lm": "validate",
    "translation": "test",
    "vit": "test",
    "clip": "test",
}
# CLIP's in-batch contrastive loss depends on which samples share a batch (ranks' batches are gathered into one
# bigger batch under DDP), so it is not a per-sample metric and cannot agree; its zero-shot and recall@K must.
BATCH_DEPENDENT = {"clip": ("/loss",)}


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("polyformer-cache")


def metrics(out, command: str, rank: int = 0) -> dict[str, float]:
    values = json.loads((out / f"rank{rank}.json").read_text())[command]
    return {k: v for k, v in values.items() if not k.startswith("train")}


@pytest.mark.slow
@pytest.mark.parametrize("task", list(CASES))
def test_one_and_two_processes_evaluate_alike(task, tmp_path, cache):
    command = CASES[task]
    # A checkpoint of our own, so this test does not depend on how the preset keeps its checkpoints.
    polyformer(["fit", *task_args(task, trainer="cpu.yaml"), "--trainer.max_steps=4", "--trainer.limit_val_batches=0",
                f"--trainer.default_root_dir={tmp_path / 'fit'}", "--trainer.callbacks+=ModelCheckpoint",
                f"--trainer.callbacks.dirpath={tmp_path / 'ckpt'}", "--trainer.callbacks.save_last=true",
                "--trainer.callbacks.every_n_train_steps=4"],  # a state key of its own beside the preset's
               tmp_path, cache)  # fmt: skip
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    results = {}
    for trainer, procs in (("cpu.yaml", 1), ("ddp-cpu.yaml", 2)):
        out = tmp_path / f"probe{procs}"
        polyformer([command, *task_args(task, trainer=trainer), f"--ckpt_path={ckpt}", *probe_args(out),
                    f"--trainer.default_root_dir={tmp_path / command}"], tmp_path, cache)  # fmt: skip
        results[procs] = metrics(out, command)
        if procs == 2:  # every rank ends with the same synchronised numbers
            assert metrics(out, command, rank=1) == results[2], f"{task}: ranks disagree on the {command} metrics"
    one, two = results[1], results[2]
    skip = BATCH_DEPENDENT.get(task, ())
    keys = sorted(k for k in one if not k.endswith(skip))
    print(f"{task} {command}: " + ", ".join(f"{k} {one[k]:.6g} / {two.get(k, float('nan')):.6g}" for k in keys))
    assert keys, f"{task}: no metrics were logged by {command}"
    assert set(one) == set(two), f"different metrics: {sorted(set(one) ^ set(two))}"
    bad = {k: (one[k], two[k]) for k in keys if not math.isclose(one[k], two[k], rel_tol=1e-5, abs_tol=1e-6)}
    assert not bad, f"{task}: 1-process vs 2-process {command} metrics differ: {bad}"
