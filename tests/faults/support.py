"""Shared by the fault tests (importable as `faults.support`, also from a CLI subprocess with tests/ on PYTHONPATH):
a tiny language-model config, the one-line-error assertion, and real tasks with one fault switched on. The faults
are produced for real (a NaN loss from real arithmetic, a real failed allocation); nothing in the code under test
(guards, CLI, checkpointing) is replaced."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from polyformer.tasks.language_model import LanguageModel

TINY_LM = {
    "seed_everything": 0,
    "trainer": {
        "accelerator": "cpu",
        "devices": 1,
        "precision": "32-true",
        "max_steps": 6,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
        "callbacks": [
            {
                "class_path": "polyformer.checkpointing.ResumableCheckpoint",
                "init_args": {"dirpath": "ckpts", "every_n_train_steps": 1, "save_last": True},
            }
        ],
    },
    "model": {
        "class_path": "polyformer.tasks.language_model.LanguageModel",
        "init_args": {
            "backbone": {
                "width": 32, "depth": 1, "heads": 2, "position": "learned", "max_len": 32, "causal": True,
                "dropout": 0.0,
            },
            "optimizer": {"warmup_steps": 0, "lr": 1e-3},
        },
    },
    "data": {
        "class_path": "polyformer.data.text.TextDataModule",
        "init_args": {"source": "builtin", "tokenizer": "byte", "block_size": 16, "batch_size": 4},
    },
}  # fmt: skip


def assert_one_line_error(result, *fragments: str) -> str:
    """Exit code 1, no traceback, and the message naming what it should; returns the error line."""
    err = result.stderr
    assert result.returncode == 1, f"exit code {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{err}"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("polyformer: error:")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def run_main(capsys, args: list[str]) -> str:
    """`polyformer.cli.main` in this process (what the command runs): exit code 1 and one error line, returned."""
    from polyformer.cli import main

    code = main(args)
    err = capsys.readouterr().err
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.startswith("polyformer: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


class NaNLanguageModel(LanguageModel):
    """The language model with a NaN at the given optimizer steps, as after a bad batch or an overflow.

    nan_in="loss": a NaN constant is added to the loss, so the gradients stay finite: only the loss check can see it,
    and without the guard the update would go through unnoticed. nan_in="gradients": the loss stays finite and the
    gradients become NaN, through 0 * d/dx sqrt(x) at x = 0 (= 0 * inf) on the output head.
    """

    def __init__(
        self,
        *args: Any,
        nan_steps: list[int] | None = None,
        nan_rank: int | None = None,  # None: every rank; an int: only that rank sees the NaN
        nan_in: Literal["loss", "gradients"] = "loss",
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.nan_steps, self.nan_rank, self.nan_in = set(nan_steps or []), nan_rank, nan_in

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.trainer.global_step in self.nan_steps and self.nan_rank in (None, self.global_rank):
            if self.nan_in == "loss":
                return loss + torch.tensor(float("nan"))
            w = self.model.head.weight
            return loss + 0.0 * torch.sqrt((w - w.detach()).sum())  # forward adds 0; backward gives NaN
        return loss


class HugeActivationLanguageModel(LanguageModel):
    """The language model whose training step needs an activation far larger than any machine's memory."""

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        scratch = torch.empty(batch.shape[0] * 2**45)  # ~0.5 PB for a batch of 4: the allocator refuses at once
        return super().training_step(batch, batch_idx) + scratch[:1].sum() * 0
