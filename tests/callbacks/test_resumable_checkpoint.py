"""`last.ckpt` must be the latest state even when the monitored metric stops improving."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from polyformer.callbacks.checkpoint import ResumableCheckpoint


class Regressor(L.LightningModule):
    """Logs a validation score that only gets worse, so the best checkpoint stays at the first validation."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.layer(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("val/score", -float(self.current_epoch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class SaveCounter(L.Callback):
    def __init__(self) -> None:
        self.saved_at: list[int] = []

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.saved_at.append(trainer.global_step)


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)  # 4 steps an epoch


@pytest.mark.parametrize("save_last", [True, "link"])
def test_last_checkpoint_is_the_latest_state(tmp_path, save_last):
    ckpt = ResumableCheckpoint(dirpath=tmp_path, monitor="val/score", mode="max", save_last=save_last)
    counter = SaveCounter()
    trainer = L.Trainer(max_epochs=4, callbacks=[ckpt, counter], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip
    model = Regressor()
    trainer.fit(model, loader(), loader())

    assert trainer.global_step == 16
    assert ckpt.best_model_path.endswith("epoch=0-step=4.ckpt")  # the score only got worse after epoch 0
    assert (tmp_path / "last.ckpt").is_file() and not (tmp_path / "last.ckpt").is_symlink()
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert last["global_step"] == 16
    torch.testing.assert_close(last["state_dict"]["layer.weight"], model.layer.weight.detach(), rtol=0, atol=0)
    best = torch.load(ckpt.best_model_path, weights_only=True)
    assert best["global_step"] == 4
    # One write per save point, plus the top-k file the first time (which `link` links to): nothing written twice.
    assert counter.saved_at == ([4, 4, 8, 12, 16] if save_last is True else [4, 8, 12, 16])
