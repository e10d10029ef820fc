"""Exact resume: N steps in one go equal N/2 steps + resume + N/2 steps, weights within float tolerance, with dropout
on (so the random state must come back too), for the language model and an image task.

Two ways to stop and resume are checked:
- `--ckpt_path last` after a run bounded by `trainer.max_steps` (the "train longer" case);
- a checkpoint written mid-epoch by a running fit (what a crash or SLURM preemption leaves behind).
The cosine schedule's length is pinned (`optimizer.max_steps`), so stopping early does not change it.
"""

from __future__ import annotations

import pytest
import torch
from e2e.scaleout import last_checkpoint, max_abs_diff, polyformer, task_args

N = 6  # optimizer steps of the uninterrupted run


def common(task: str) -> list[str]:
    return [
        *task_args(task, trainer="cpu.yaml"),
        f"--model.init_args.optimizer.max_steps={N}",
        "--trainer.check_val_every_n_epoch=null",  # count val_check_interval in steps, across epochs
        "--trainer.val_check_interval=3",  # validates (and saves last.ckpt) at N/2 and N
        "--trainer.limit_val_batches=2",
    ]


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("polyformer-cache")


@pytest.fixture(scope="module")
def straight(request, tmp_path_factory, cache):
    """The uninterrupted N-step runs, one per task, each also keeping a checkpoint at step N/2."""
    runs = {}

    def get(task: str):
        if task not in runs:
            root = tmp_path_factory.mktemp(f"{task}-straight")
            polyformer(
                [
                    "fit",
                    *common(task),
                    f"--trainer.max_steps={N}",
                    f"--trainer.default_root_dir={root}",
                    "--trainer.callbacks+=polyformer.checkpointing.ResumableCheckpoint",
                    f"--trainer.callbacks.dirpath={root / 'every'}",
                    f"--trainer.callbacks.every_n_train_steps={N // 2}",
                    "--trainer.callbacks.save_top_k=-1",
                    "--trainer.callbacks.filename={step}",  # -> step=3.ckpt
                ],
                root,
                cache,
            )
            runs[task] = root
        return runs[task]

    return get


def straight_weights(reference) -> dict[str, torch.Tensor]:
    """The uninterrupted run's weights after exactly N steps, from its every-N/2-steps checkpoint.

    Read from the file named for step N, not from last.ckpt, so the reference does not depend on how each preset keeps
    last.ckpt (with Lightning's own `ModelCheckpoint` a monitored metric that stops improving leaves it stale)."""
    state = torch.load(reference / "every" / f"step={N}.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == N, f"the reference checkpoint is at step {state['global_step']}, not {N}"
    return state["state_dict"]


def assert_same_weights(task: str, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], how: str) -> None:
    diff = max_abs_diff(a, b)
    print(f"{task} {how}: max |straight - resumed| = {diff:.3g}")
    # Same operations on the same data in the same order: equal up to float reassociation (bf16 autocast presets).
    assert diff < 1e-5, f"{task}: resuming {how} changed the weights by up to {diff:.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("task", ["lm", "vit"])
def test_ckpt_path_last_resumes_exactly(task, tmp_path, cache, straight):
    reference = straight(task)
    args = ["fit", *common(task), f"--trainer.default_root_dir={tmp_path}"]
    polyformer([*args, f"--trainer.max_steps={N // 2}"], tmp_path, cache)
    last = last_checkpoint(tmp_path)
    assert torch.load(last, weights_only=True)["global_step"] == N // 2
    polyformer([*args, f"--trainer.max_steps={N}", "--ckpt_path=last"], tmp_path, cache)
    # `last` = the newest run's last checkpoint; the resumed fit writes into a run directory of its own (`latest`).
    resumed_path = tmp_path / "latest" / "checkpoints" / "last.ckpt"
    assert resumed_path.resolve() != last.resolve() and torch.load(last, weights_only=True)["global_step"] == N // 2
    resumed = torch.load(resumed_path, weights_only=True)
    assert resumed["global_step"] == N
    assert_same_weights(task, straight_weights(reference), resumed["state_dict"], "with --ckpt_path last")


@pytest.mark.slow
@pytest.mark.parametrize("task", ["lm"])
def test_mid_epoch_checkpoint_resumes_exactly(task, tmp_path, cache, straight):
    reference = straight(task)
    halfway = reference / "every" / f"step={N // 2}.ckpt"
    state = torch.load(halfway, weights_only=True)
    loader = state["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert loader["batches_done"] == N // 2, f"the checkpoint does not hold the data position: {loader}"
    polyformer(
        [
            "fit",
            *common(task),
            f"--trainer.max_steps={N}",
            f"--trainer.default_root_dir={tmp_path}",
            f"--ckpt_path={halfway}",
        ],
        tmp_path,
        cache,
    )
    resumed = torch.load(last_checkpoint(tmp_path), map_location="cpu", weights_only=True)
    assert resumed["global_step"] == N
    assert_same_weights(task, straight_weights(reference), resumed["state_dict"], "from a mid-epoch checkpoint")


def test_rng_states_survive_a_weights_only_checkpoint(tmp_path):
    """The stored states are plain tensors/lists, and restoring them replays torch, numpy and python draws."""
    import random

    import numpy as np

    from polyformer.checkpointing.rng import RNGState

    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    callback = RNGState()
    torch.save({"rng": callback.state_dict()}, tmp_path / "c.pt")
    expected = (torch.rand(4), random.random(), np.random.rand(4))
    torch.rand(7)  # move every generator on, as training would
    random.random()
    np.random.rand(2)
    callback.load_state_dict(torch.load(tmp_path / "c.pt", weights_only=True)["rng"])
    callback.on_train_start(None, None)  # type: ignore[arg-type]  # what a resumed fit calls
    again = (torch.rand(4), random.random(), np.random.rand(4))
    assert torch.equal(expected[0], again[0]) and expected[1] == again[1] and np.array_equal(expected[2], again[2])


def test_rng_state_does_not_replay_the_same_augmentation_every_batch(tmp_path):
    """Batches are loaded (and augmented) before the training step: the callback must not rewind the RNG there, or
    every batch would draw the same augmentation. Draws made while loading must differ from batch to batch."""
    import lightning as L

    from polyformer.checkpointing.rng import RNGState

    class Augmented(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, i: int) -> torch.Tensor:
            return torch.rand(1)  # stands for a random crop drawn while the batch is loaded

    class Recorder(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[float] = []

        def training_step(self, batch, batch_idx):
            self.seen.append(float(batch.sum()))
            return (self.w * batch).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    from polyformer.data.loading import ResumableLoader

    model = Recorder()
    L.seed_everything(0)
    trainer = L.Trainer(max_steps=4, callbacks=[RNGState()], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(model, ResumableLoader(Augmented(), batch_size=2, shuffle=False))
    assert len(set(model.seen)) == 4, model.seen
