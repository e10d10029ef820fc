"""Untrusted and damaged checkpoints: a pickle crafted to run code is refused (and really would have run code), a
truncated file gives a clear message, a checkpoint of another task or architecture is refused naming the field;
every CLI Trainer writes checkpoints atomically, also when a preset sets its own plugins, and a process killed
in the middle of a save leaves the previous checkpoint whole."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from faults.support import run_main
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

from polyformer.checkpointing.files import CheckpointError, load_checkpoint, read_checkpoint
from polyformer.checkpointing.io import AtomicCheckpointIO, with_atomic_checkpoint_io
from polyformer.checkpointing.loading import load_task
from polyformer.cli import make_cli_class
from polyformer.tasks.base import TaskModule
from polyformer.tasks.language_model import LanguageModel


class CreatesFile:
    """Unpickling this object calls open(path, "w"): the file appears if and only if the pickle was executed."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def write_malicious_checkpoint(path: Path, marker: Path) -> None:
    # Looks like a Lightning checkpoint; the payload hides among the hyperparameters.
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": {"x": CreatesFile(marker)}}, path)


def test_malicious_pickle_is_refused_and_would_have_run(tmp_path):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.ckpt"
    write_malicious_checkpoint(evil, marker)
    for load in (read_checkpoint, load_checkpoint, load_task, lambda p: AtomicCheckpointIO().load_checkpoint(p)):
        with pytest.raises(CheckpointError, match="refusing to load .*evil.ckpt: it holds objects"):
            load(evil)
    assert not marker.exists()
    # Control: the payload is real. Unpickled the unsafe way, it runs and creates the file.
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_malicious_pickle_refused_by_the_cli(capsys, tiny_lm_config, tmp_path):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.ckpt"
    write_malicious_checkpoint(evil, marker)
    assert "refusing to load" in run_main(capsys, ["fit", "--config", str(tiny_lm_config()), "--ckpt_path", str(evil)])
    assert "refusing to load" in run_main(capsys, ["generate", "--ckpt", str(evil), "--prompt", "hi"])
    assert not marker.exists()
    assert not (tmp_path / "ckpts").exists()


def test_truncated_checkpoint(lm_checkpoint, tmp_path, capsys, tiny_lm_config):
    data = lm_checkpoint.read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.ckpt is not a readable checkpoint \\(truncated or corrupt\\?\\)"):
        load_checkpoint(cut)
    line = run_main(capsys, ["fit", "--config", str(tiny_lm_config()), "--ckpt_path", str(cut)])
    assert "cut.ckpt is not a readable checkpoint (truncated or corrupt?)" in line
    assert "cut.ckpt is not a readable checkpoint" in run_main(
        capsys, ["generate", "--ckpt", str(cut), "--prompt", "a"]
    )


def test_resume_with_another_architecture_names_the_field(lm_checkpoint, capsys, tiny_lm_config, tmp_path):
    args = ["fit", "--config", str(tiny_lm_config()), "--ckpt_path", str(lm_checkpoint), "--model.backbone.width=64"]
    line = run_main(capsys, args)
    assert "backbone.width is 32 in the checkpoint but 64 in the config" in line
    assert "missing" not in line.lower() and "unexpected" not in line.lower()  # not a wall of state_dict keys
    assert not (tmp_path / "ckpts").exists()


def test_checkpoint_of_another_task_is_refused(lm_checkpoint, tmp_path):
    from polyformer.tasks.image_classification import ImageClassifier

    with pytest.raises(CheckpointError, match="is a LanguageModel checkpoint; this command needs a ImageClassifier"):
        load_task(lm_checkpoint, expected=ImageClassifier)
    # Resuming: TaskModule.on_load_checkpoint names the task before any weights are touched.
    image_task = ImageClassifier(num_classes=10, image_size=8, channels=1, patch_size=4)
    with pytest.raises(ValueError, match="the checkpoint is a LanguageModel, not a ImageClassifier"):
        image_task.on_load_checkpoint(load_checkpoint(lm_checkpoint))


def test_checkpoint_naming_a_foreign_class_is_refused(lm_checkpoint, tmp_path):
    ckpt = load_checkpoint(lm_checkpoint)
    for task in ("os.system", "subprocess.Popen", "polyformer.checkpointing.files.CheckpointError"):
        ckpt["polyformer"]["task"] = task
        path = tmp_path / "foreign.ckpt"
        torch.save(ckpt, path)
        with pytest.raises(CheckpointError, match="which is not a polyformer task; refusing it"):
            load_task(path)


def test_real_checkpoints_load_weights_only(lm_checkpoint):
    """What `fit` writes (metadata, optimizer, loops, callbacks, tokenizer) loads under weights_only=True."""
    ckpt = read_checkpoint(lm_checkpoint)
    assert ckpt["global_step"] == 2 and "tokenizer" in ckpt and ckpt["polyformer"]["task"].endswith("LanguageModel")
    model = load_task(lm_checkpoint, expected=LanguageModel)
    assert model.generate_text(["The "], max_new_tokens=3, temperature=0.0)


# ---- atomic writes --------------------------------------------------------------------------------------------
def cli_trainer(tmp_path: Path, config: Path, *extra: str) -> L.Trainer:
    cli = make_cli_class()(
        TaskModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=["--config", str(config), *extra],
        run=False,
        auto_configure_optimizers=False,
    )
    return cli.trainer


@pytest.mark.parametrize(
    "plugins, expected",
    [
        ("null", AtomicCheckpointIO),
        ("[{class_path: lightning.fabric.plugins.environments.LightningEnvironment}]", AtomicCheckpointIO),
        ("[{class_path: lightning.pytorch.plugins.io.TorchCheckpointIO}]", AtomicCheckpointIO),
        ("[{class_path: lightning.pytorch.plugins.io.AsyncCheckpointIO}]", AsyncCheckpointIO),
    ],
)
def test_every_cli_trainer_writes_atomically(plugins, expected, tmp_path, tiny_lm_config):
    trainer = cli_trainer(tmp_path, tiny_lm_config(), f"--trainer.plugins={plugins}")
    io = trainer.strategy.checkpoint_io
    assert type(io) is expected
    if isinstance(io, AsyncCheckpointIO):  # the preset's async writer kept, writing through ours
        assert isinstance(io.checkpoint_io, AtomicCheckpointIO)
    if "LightningEnvironment" in plugins:  # the preset's plugin kept too
        assert type(trainer._accelerator_connector.cluster_environment).__name__ == "LightningEnvironment"


def test_a_foreign_checkpoint_io_is_kept_with_a_warning():
    class Custom(TorchCheckpointIO):
        pass

    with pytest.warns(UserWarning, match="atomic checkpoint writes are not used"):
        plugins = with_atomic_checkpoint_io([Custom()])
    assert [type(p) for p in plugins] == [Custom]


KILL_DURING_SAVE = textwrap.dedent(
    """
    import sys, torch
    from polyformer.checkpointing.io import AtomicCheckpointIO
    io = AtomicCheckpointIO()
    for version in range(1000):  # ~32 MB each: a save takes long enough to be caught in the middle
        io.save_checkpoint({"version": version, "state_dict": {"w": torch.full((8 * 2**20,), version)}}, sys.argv[1])
        print(version, flush=True)
    """
)


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_whole(tmp_path):
    last = tmp_path / "last.ckpt"
    proc = subprocess.Popen([sys.executable, "-c", KILL_DURING_SAVE, str(last)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "0"  # version 0 is complete
        tmp = tmp_path / f"last.ckpt.tmp-{proc.pid}"
        deadline = time.monotonic() + 60
        while not (tmp.exists() and tmp.stat().st_size > 0) and time.monotonic() < deadline:
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGKILL)  # in the middle of writing the next version
    finally:
        proc.kill()
        proc.wait()
    assert tmp.exists(), "the kill did not land during a save"
    with pytest.raises(CheckpointError):  # what was being written is incomplete ...
        read_checkpoint(tmp)
    ckpt = read_checkpoint(last)  # ... but last.ckpt is a whole, earlier version
    weights = ckpt["state_dict"]["w"]
    assert weights.numel() == 8 * 2**20 and bool((weights == ckpt["version"]).all())
    # The next save in that directory cleans the dead writer's partial file up.
    AtomicCheckpointIO().save_checkpoint({"version": -1}, last)
    assert not tmp.exists() and read_checkpoint(last)["version"] == -1


def test_pickle_protocol_is_not_the_way_in(tmp_path):
    """A raw pickle (not torch's zip format) with a payload is refused too."""
    marker = tmp_path / "PWNED"
    raw = tmp_path / "raw.ckpt"
    raw.write_bytes(pickle.dumps({"state_dict": CreatesFile(marker)}))
    with pytest.raises(CheckpointError):
        read_checkpoint(raw)
    assert not marker.exists()
