"""Golden loss curves: a fixed-seed tiny run of each task through a real Lightning Trainer on CPU (one thread, fp32,
deterministic), whose per-step training losses are stored next to this file as `<task>.json`. A refactor that
changes the numerics of the backbone, a task, its data pipeline or the optimizer schedule changes these numbers.

Test support, not platform code: the curves and the code that makes them both live under tests/, imported as
`golden.curves` (pytest puts tests/ on the path; `scripts/golden_curves.py` does the same).
Regenerate (after an intended change) with: python scripts/golden_curves.py
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch

from polyformer.backbone import TransformerConfig
from polyformer.tasks.base import OptimizerConfig

GOLDEN_DIR = Path(__file__).resolve().parent  # the <task>.json curves sit beside their code
REGENERATE = "python scripts/golden_curves.py"
STEPS = 30
SEED = 0
RTOL, ATOL = 1e-4, 1e-6  # a changed formula moves the loss by far more; thread or ISA jitter by far less


def _optimizer() -> OptimizerConfig:
    return OptimizerConfig(lr=3e-3, warmup_steps=5, max_steps=STEPS)


def lm(tmp: Path) -> tuple[L.LightningModule, L.LightningDataModule]:
    from polyformer.data.text import TextDataModule
    from polyformer.tasks.language_model import LanguageModel

    backbone = TransformerConfig(width=32, depth=2, heads=2, position="learned", max_len=32, causal=True, dropout=0.1)
    data = TextDataModule(source="builtin", tokenizer="byte", block_size=32, batch_size=8, cache_dir=str(tmp))
    return LanguageModel(backbone, optimizer=_optimizer()), data


def vit(tmp: Path) -> tuple[L.LightningModule, L.LightningDataModule]:
    from polyformer.data.images import ImageDataModule
    from polyformer.tasks.image_classification import ImageClassifier

    backbone = TransformerConfig(width=32, depth=2, heads=2, dropout=0.0, position="none")
    return ImageClassifier(backbone, patch_size=2, optimizer=_optimizer()), ImageDataModule("digits", batch_size=32)


def mt(tmp: Path) -> tuple[L.LightningModule, L.LightningDataModule]:
    from polyformer.data.translation import TranslationData
    from polyformer.tasks.translation import Translation

    backbone = TransformerConfig(width=32, depth=1, heads=2, max_len=128, dropout=0.1)
    data = TranslationData("numbers", bpe_vocab_size=300, batch_size=16, train_size=400, val_size=16, test_size=16)
    return Translation(backbone, decoder_depth=1, optimizer=_optimizer()), data


def clip(tmp: Path) -> tuple[L.LightningModule, L.LightningDataModule]:
    from polyformer.data.image_text import ImageTextData
    from polyformer.tasks.contrastive import CLIP, ImageEncoderConfig, TextEncoderConfig

    image = ImageEncoderConfig(
        TransformerConfig(width=32, depth=1, heads=2, dropout=0.0, position="none"),
        image_size=8, patch_size=2, channels=1, norm_pre=False,
    )  # fmt: skip
    text = TextEncoderConfig(
        TransformerConfig(width=32, depth=1, heads=2, dropout=0.0, position="learned", max_len=32, causal=True)
    )
    data = ImageTextData("digits", tokenizer="byte", context_length=32, batch_size=32)
    return CLIP(image, text, embed_dim=32, optimizer=_optimizer()), data


RUNS: dict[str, Callable[[Path], tuple[L.LightningModule, L.LightningDataModule]]] = {
    "lm": lm,
    "vit": vit,
    "mt": mt,
    "clip": clip,
}


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))


@contextlib.contextmanager
def _reproducible() -> Iterator[None]:
    """One thread (reductions split across threads sum in another order), deterministic kernels; restored after."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def run_curve(task: str, steps: int = STEPS) -> list[float]:
    """Per-step training losses of the task's fixed-seed tiny run."""
    with tempfile.TemporaryDirectory() as tmp, _reproducible():
        L.seed_everything(SEED, verbose=False)
        model, data = RUNS[task](Path(tmp))
        recorder = LossRecorder()
        trainer = L.Trainer(
            accelerator="cpu", devices=1, precision="32-true", max_steps=steps, deterministic=True,
            gradient_clip_val=1.0, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[recorder], default_root_dir=tmp,
        )  # fmt: skip
        trainer.fit(model, datamodule=data)
    if len(recorder.losses) != steps:
        raise RuntimeError(f"golden run of {task} took {len(recorder.losses)} steps, expected {steps}")
    return recorder.losses


def golden_path(task: str) -> Path:
    return GOLDEN_DIR / f"{task}.json"


def write_golden(task: str, losses: list[float]) -> Path:
    path = golden_path(task)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "task": task,
        "steps": len(losses),
        "seed": SEED,
        "regenerate": REGENERATE,
        "torch": torch.__version__.split("+")[0],
        "train_loss": losses,
    }
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def read_golden(task: str) -> list[float]:
    path = golden_path(task)
    if not path.exists():
        raise FileNotFoundError(f"no golden curve for {task} at {path}; create it with `{REGENERATE}`")
    return json.loads(path.read_text())["train_loss"]


def compare(task: str, got: list[float], want: list[float]) -> str | None:
    """None when the curves agree within RTOL/ATOL, else a message naming the first differing step."""
    if len(got) != len(want):
        return f"{task}: {len(got)} steps, the golden curve has {len(want)}; if intended, regenerate: `{REGENERATE}`"
    for step, (g, w) in enumerate(zip(got, want)):
        if abs(g - w) > ATOL + RTOL * abs(w):
            return (
                f"{task}: training loss at step {step} is {g!r}, the golden curve has {w!r} "
                f"(relative difference {abs(g - w) / abs(w):.2e} > rtol {RTOL:g}). A change altered the numerics; "
                f"if that is intended, regenerate the curves with `{REGENERATE}` and commit tests/golden/*.json"
            )
    return None
