"""`last.ckpt` must be the latest state even when the monitored metric stops improving."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from polyformer.checkpointing.resumable import ResumableCheckpoint


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
    # Validation after epochs 1 and 3 (steps 8 and 16); training ends after epoch 4 (step 20), between save points.
    trainer = L.Trainer(max_epochs=5, check_val_every_n_epoch=2, callbacks=[ckpt, counter], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip
    model = Regressor()
    trainer.fit(model, loader(), loader())

    assert trainer.global_step == 20
    assert ckpt.best_model_path.endswith("epoch=1-step=8.ckpt")  # the score only got worse after the first validation
    assert (tmp_path / "last.ckpt").is_file() and not (tmp_path / "last.ckpt").is_symlink()
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert last["global_step"] == 20  # the final weights, not the best step's nor the last validation's
    torch.testing.assert_close(last["state_dict"]["layer.weight"], model.layer.weight.detach(), rtol=0, atol=0)
    best = torch.load(ckpt.best_model_path, weights_only=True)
    assert best["global_step"] == 8
    # One write per save point, plus the top-k file the first time (which `link` links to): nothing written twice.
    assert counter.saved_at == ([8, 8, 16, 20] if save_last is True else [8, 16, 20])
