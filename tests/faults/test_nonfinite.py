"""A NaN/Inf loss stops the run naming the step (the last good checkpoint untouched), or skips the update without
touching the weights, until too many bad steps in a row; out-of-memory names the knobs that trade memory for time.
All through the CLI with real training (in this process; the DDP case as a real 2-process run)."""

from __future__ import annotations

import re

import pytest
import torch
from faults.support import run_main

from polyformer.checkpointing.files import read_checkpoint

NAN_LM = "--model.class_path=faults.support.NaNLanguageModel"


def weights(path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)["state_dict"]


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(capsys, tiny_lm_config, tmp_path):
    line = run_main(capsys, ["fit", "--config", str(tiny_lm_config()), NAN_LM, "--model.nan_steps=[3]"])
    assert "the training loss is nan at step 3 (epoch 0, batch 3)" in line
    assert "last.ckpt) was not touched" in line and "--guards.on_nonfinite=skip" in line
    last = read_checkpoint(tmp_path / "ckpts" / "last.ckpt")
    assert last["global_step"] == 3  # written after step 2, before the bad step; nothing after it
    assert all(bool(t.isfinite().all()) for t in last["state_dict"].values() if t.is_floating_point())


def test_nan_loss_skip_leaves_weights_and_optimizer_alone(capsys, recwarn, tiny_lm_config, tmp_path):
    config = tiny_lm_config(**{"trainer.callbacks": [_every_step_checkpoints()]})
    code = _run_ok(["fit", "--config", str(config), NAN_LM, "--model.nan_steps=[2,4]", "--guards.on_nonfinite=skip"])
    assert code == 0, capsys.readouterr().err
    warned = [str(w.message) for w in recwarn if "skipped this step" in str(w.message)]
    assert warned == [
        "the training loss is nan at step 2 (epoch 0, batch 2): skipped this step (1 skipped so far)",
        "the training loss is nan at step 4 (epoch 0, batch 4): skipped this step (2 skipped so far)",
    ]
    ckpts = tmp_path / "ckpts"
    assert read_checkpoint(ckpts / "last.ckpt")["global_step"] == 6  # the run went on to max_steps
    # The skipped step (step 2, between checkpoints step=2 and step=3) changed neither weights nor Adam's moments,
    # although its gradients were finite; the step before it did change them.
    before, after = read_checkpoint(ckpts / "epoch=0-step=2.ckpt"), read_checkpoint(ckpts / "epoch=0-step=3.ckpt")
    for key, value in before["state_dict"].items():
        torch.testing.assert_close(after["state_dict"][key], value, rtol=0, atol=0)
    for i, state in before["optimizer_states"][0]["state"].items():
        torch.testing.assert_close(after["optimizer_states"][0]["state"][i]["exp_avg"], state["exp_avg"])
    earlier = read_checkpoint(ckpts / "epoch=0-step=1.ckpt")["state_dict"]
    assert any(not torch.equal(earlier[k], v) for k, v in before["state_dict"].items())


def test_nan_gradients_with_a_finite_loss_stop_too(capsys, tiny_lm_config, tmp_path):
    args = ["fit", "--config", str(tiny_lm_config()), NAN_LM, "--model.nan_steps=[2]", "--model.nan_in=gradients"]
    line = run_main(capsys, args)
    assert "the gradients are not finite (inf or nan) at step 2 (epoch 0, batch 2)" in line
    assert read_checkpoint(tmp_path / "ckpts" / "last.ckpt")["global_step"] == 2


def test_too_many_skips_in_a_row_stop_the_run(capsys, tiny_lm_config):
    args = ["fit", "--config", str(tiny_lm_config()), NAN_LM, "--model.nan_steps=[1,2,3,4]"]
    line = run_main(capsys, [*args, "--guards.on_nonfinite=skip", "--guards.max_consecutive_skips=3"])
    assert "the training loss is nan at step 3" in line and "3 non-finite steps in a row" in line


def test_guards_off_lets_nan_through(capsys, tiny_lm_config, tmp_path):
    """The switch really is the guard: with it off, the same run finishes (and trains on through a NaN loss)."""
    code = _run_ok(
        ["fit", "--config", str(tiny_lm_config()), NAN_LM, "--model.nan_steps=[3]", "--guards.on_nonfinite=off"]
    )
    assert code == 0, capsys.readouterr().err
    assert read_checkpoint(tmp_path / "ckpts" / "last.ckpt")["global_step"] == 6


def test_out_of_memory_names_the_knobs(capsys, tiny_lm_config):
    args = ["fit", "--config", str(tiny_lm_config()), "--model.class_path=faults.support.HugeActivationLanguageModel"]
    line = run_main(capsys, args)
    assert "out of memory: lower data.batch_size (now 4, e.g. 2)" in line
    assert "raise trainer.accumulate_grad_batches (now 1, e.g. 2)" in line
    assert "trainer.precision=bf16-mixed (now 32-true)" in line and "model.activation_checkpointing=true" in line
    assert "can't allocate memory" in line  # the original error, shortened to its first line


@pytest.mark.slow
def test_nan_on_one_ddp_rank_stops_every_rank(polyformer, tiny_lm_config, tmp_path):
    """The NaN is on rank 1 only and the gradients stay finite: without the cross-rank decision rank 0 would go on
    alone and wait forever in the next all-reduce."""
    config = tiny_lm_config(**{"trainer.strategy": "ddp", "trainer.devices": 2})
    result = polyformer(
        "fit", "--config", str(config), NAN_LM, "--model.nan_steps=[2]", "--model.nan_rank=1", timeout=240
    )
    assert result.returncode == 1
    errors = sorted(re.findall(r"polyformer: error: [^\n]*? skip such steps\.", result.stderr))
    assert len(errors) == 2, result.stderr  # each rank stopped on its own, with the same step
    assert "the loss or gradients on another rank are not finite at step 2 (epoch 0, batch 2)" in errors[0]
    assert "the training loss is nan at step 2 (epoch 0, batch 2)" in errors[1]
    assert read_checkpoint(tmp_path / "ckpts" / "last.ckpt")["global_step"] == 2


def _every_step_checkpoints() -> dict:
    return {
        "class_path": "polyformer.checkpointing.ResumableCheckpoint",
        "init_args": {"dirpath": "ckpts", "every_n_train_steps": 1, "save_last": True, "save_top_k": -1},
    }


def _run_ok(args: list[str]) -> int:
    from polyformer.cli import main

    return main(args)
