"""Dashboard media after validation: what a model learned, not just its loss curve.

The task says what to show through one typed method, `TaskModule.media(batch, request) -> list[Table | Images |
Heatmap | Scalars]` (`polyformer.tasks.media`), given the first rows of the first validation batch; this callback
renders those items and logs them, and knows no task. What each task shows is documented on its `media` method:
LM samples, translations with sentence BLEU and the corpus signature, the confusion matrix and misclassified
images, CLIP's similarity matrix, zero-shot accuracy per class and retrieval examples.

For any task it also logs the attention maps of the first validation example, per layer and head (recomputed from
hooked inputs of the task's model, `polyformer.callbacks.attention_maps`: the backbone keeps no weights).

Everything runs on global rank 0 only and calls no collective: other ranks do no extra work. Media go to W&B as
tables and images, to TensorBoard as text and images; other loggers get the scalar parts only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torch import Tensor

from polyformer.callbacks.attention_maps import AttentionRecorder
from polyformer.tasks.base import TaskModule
from polyformer.tasks.media import Heatmap, Images, Media, MediaRequest, Scalars, Table

Image = np.ndarray  # (H, W, 3) uint8


# ---- logging that degrades to what the logger supports ----------------------------------------------------------
def media_loggers(trainer: pl.Trainer) -> list[Any]:
    """Loggers that show tables or images (W&B unless WANDB_MODE=disabled, TensorBoard): without one, media are not
    even computed."""

    def wandb_on(lg: WandbLogger) -> bool:
        mode = lg._wandb_init.get("mode") or os.environ.get("WANDB_MODE", "")
        return mode.lower() != "disabled"

    return [
        lg
        for lg in trainer.loggers
        if isinstance(lg, TensorBoardLogger) or (isinstance(lg, WandbLogger) and wandb_on(lg))
    ]


def log_table(trainer: pl.Trainer, key: str, columns: list[str], rows: list[list[Any]]) -> None:
    """A table: a W&B Table (numpy images in cells become images), a markdown table in TensorBoard."""
    for lg in trainer.loggers:
        if isinstance(lg, WandbLogger):
            import wandb

            data = [[wandb.Image(c) if isinstance(c, np.ndarray) else c for c in row] for row in rows]
            lg.log_table(key=key, columns=columns, data=data, step=trainer.global_step)
        elif isinstance(lg, TensorBoardLogger):
            cell = lambda c: "(image)" if isinstance(c, np.ndarray) else str(c).replace("|", "\\|").replace("\n", " ")  # noqa: E731
            lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
            lg.experiment.add_text(key, "\n".join(lines), trainer.global_step)


def log_images(trainer: pl.Trainer, key: str, images: Sequence[Image], captions: Sequence[str] | None = None) -> None:
    for lg in trainer.loggers:
        if isinstance(lg, WandbLogger):
            extra = {"caption": list(captions)} if captions else {}
            lg.log_image(key=key, images=list(images), step=trainer.global_step, **extra)
        elif isinstance(lg, TensorBoardLogger):
            for i, img in enumerate(images):
                lg.experiment.add_image(f"{key}/{i}", img, trainer.global_step, dataformats="HWC")


def log_scalars(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    for lg in trainer.loggers:
        lg.log_metrics(metrics, step=trainer.global_step)


# ---- rendering ----------------------------------------------------------------------------------------------------
def to_image(x: Tensor, min_side: int = 64) -> Image:
    """(C, H, W) or (H, W) image of any range -> (H', W', 3) uint8, min-max scaled, enlarged by whole pixels."""
    x = x.detach().float().cpu()
    x = x[None] if x.ndim == 2 else x
    x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-8)
    x = x.expand(3, -1, -1) if x.shape[0] == 1 else x[:3]
    k = max(1, -(-min_side // min(x.shape[1:])))  # nearest-neighbour: 8x8 digits stay crisp
    img = (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return img.repeat(k, axis=0).repeat(k, axis=1)


def heatmap(
    matrix: Tensor | np.ndarray,
    title: str,
    xlabels: Sequence[str] | None = None,
    ylabels: Sequence[str] | None = None,
    annotate: bool = False,
    xlabel: str = "",
    ylabel: str = "",
) -> Image:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = np.asarray(matrix.float().cpu() if isinstance(matrix, Tensor) else matrix, dtype=float)
    side = min(12.0, 3.0 + 0.35 * max(m.shape))
    fig = Figure(figsize=(side, side * 0.85), dpi=80)
    ax = fig.subplots()
    im = ax.imshow(m, cmap="viridis")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    for labels, ticks, set_labels in ((xlabels, ax.set_xticks, ax.set_xticklabels),
                                      (ylabels, ax.set_yticks, ax.set_yticklabels)):  # fmt: skip
        if labels is not None:
            ticks(range(len(labels)))
            set_labels([s[:30] for s in labels], fontsize=7, rotation=90 if set_labels == ax.set_xticklabels else 0)
    if annotate:
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=6, color="w" if v < m.max() / 2 else "k")
    return _render(fig, FigureCanvasAgg)


def attention_grid(maps: dict[int, Tensor], title: str) -> Image:
    """maps: layer -> (heads, T, S); one row per layer, one column per head."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers = sorted(maps)
    heads = maps[layers[0]].shape[0]
    fig = Figure(figsize=(1.6 * heads + 0.5, 1.6 * len(layers) + 0.6), dpi=80)
    axes = np.atleast_2d(fig.subplots(len(layers), heads, squeeze=False))
    for r, layer in enumerate(layers):
        for h in range(heads):
            ax = axes[r, h]
            ax.imshow(maps[layer][h].float().numpy(), cmap="viridis", vmin=0.0)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"layer {layer} head {h}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    return _render(fig, FigureCanvasAgg)


def _render(fig: Any, canvas_cls: Any) -> Image:
    canvas = canvas_cls(fig)  # Agg directly, not pyplot: no global figure state, no GUI backend
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


# ---- attention maps -----------------------------------------------------------------------------------------------
def group_attention(maps: dict[str, Tensor], layers: list[int] | None, heads: list[int] | None, max_heads: int):
    """{"encoder.blocks.3.attn": (H, T, S)} -> {"encoder/attn": {3: (h, T, S)}} with the chosen layers and heads."""
    groups: dict[str, dict[int, Tensor]] = {}
    for name, w in maps.items():
        parts = name.split(".")
        if "blocks" not in parts:
            continue
        i = parts.index("blocks")
        stack, layer, kind = ".".join(parts[:i]) or "backbone", int(parts[i + 1]), ".".join(parts[i + 2 :])
        if layers is not None and layer not in layers:
            continue
        chosen = [h for h in (heads if heads is not None else range(max_heads)) if h < w.shape[0]]
        groups.setdefault(f"{stack}/{kind}", {})[layer] = w[chosen]
    return groups


# ---- the callback -------------------------------------------------------------------------------------------------
class TaskMedia(pl.Callback):
    """Logs the task's media after every `every_n_val`-th validation (the first one included), on rank 0 only.

    Args:
        every_n_val: log after validation 1, 1 + n, 1 + 2n, ... (sanity checks are skipped); 0 turns media off.
        num_samples: rows of the sample tables (LM continuations, translations, retrieval examples) and images of
            image grids (misclassified images).
        prompts: language-model prompts; None = the task's `samples.prompts`, else the starts of validation texts.
        max_new_tokens, temperature, top_k: sampling of the language-model continuations.
        similarity_size: images x captions of the CLIP similarity matrix.
        attention: log attention maps of the first validation example.
        attention_layers, attention_heads: which layers / heads (None = all layers, the first `max_heads` heads).
        max_attention_tokens: crop maps to the first positions, so long sequences stay readable.
    """

    def __init__(
        self,
        every_n_val: int = 1,
        num_samples: int = 8,
        prompts: list[str] | None = None,
        max_new_tokens: int = 32,
        temperature: float = 0.8,
        top_k: int | None = 50,
        similarity_size: int = 16,
        attention: bool = True,
        attention_layers: list[int] | None = None,
        attention_heads: list[int] | None = None,
        max_heads: int = 4,
        max_attention_tokens: int = 64,
    ) -> None:
        if every_n_val < 0 or num_samples < 1:
            raise ValueError(f"media.every_n_val must be >= 0 and num_samples >= 1, got {every_n_val}, {num_samples}")
        self.every_n_val = every_n_val
        self.request = MediaRequest(num_samples, list(prompts or []), max_new_tokens, temperature, top_k,
                                    similarity_size)  # fmt: skip
        self.attention, self.attention_layers, self.attention_heads = attention, attention_layers, attention_heads
        self.max_heads, self.max_attention_tokens = max_heads, max_attention_tokens
        self.validations = 0
        self._active = False
        self._recorder: AttentionRecorder | None = None
        self._batch: Any = None
        self._attention_maps: dict[str, Tensor] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"validations": self.validations}  # a resumed run keeps its every-n rhythm

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validations = int(state_dict.get("validations", 0))

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._active = False
        if trainer.sanity_checking or not self.every_n_val:
            return
        self.validations += 1  # counted on every rank, so the rhythm would survive a change of rank 0
        self._active = (
            trainer.is_global_zero and bool(media_loggers(trainer)) and (self.validations - 1) % self.every_n_val == 0
        )
        self._batch, self._attention_maps = None, {}

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._active and self.attention and batch_idx == 0 and dataloader_idx == 0:
            model = pl_module.model if isinstance(pl_module, TaskModule) else pl_module
            self._recorder = AttentionRecorder(model, self.max_attention_tokens)

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._recorder is not None:
            self._recorder.remove()
            self._attention_maps, self._recorder = self._recorder.maps, None
        if self._active and batch_idx == 0 and dataloader_idx == 0:
            self._batch = _first_rows(batch, max(self.request.num_samples, self.request.similarity_size))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After the task's on_validation_epoch_end, so its confusion matrix, BLEU signature etc. are up to date.
        if not self._active:
            return
        self._active = False
        if isinstance(pl_module, TaskModule) and self._batch is not None:
            with torch.no_grad():
                for item in pl_module.media(self._batch, self.request):
                    log_media(trainer, item)
        if self._attention_maps:
            groups = group_attention(self._attention_maps, self.attention_layers, self.attention_heads, self.max_heads)
            for key, maps in groups.items():
                log_images(trainer, f"media/attention/{key}", [attention_grid(maps, f"attention of example 0: {key}")])
        self._batch, self._attention_maps = None, {}


def log_media(trainer: pl.Trainer, item: Media) -> None:
    """Render one media item and log it to every logger that shows its kind."""
    if isinstance(item, Table):
        rows = [[to_image(c) if isinstance(c, Tensor) else c for c in row] for row in item.rows]
        log_table(trainer, f"media/{item.key}", item.columns, rows)
    elif isinstance(item, Images):
        log_images(trainer, f"media/{item.key}", [to_image(x) for x in item.images], item.captions)
    elif isinstance(item, Heatmap):
        image = heatmap(item.matrix, item.title, item.xlabels, item.ylabels, item.annotate, item.xlabel, item.ylabel)
        log_images(trainer, f"media/{item.key}", [image])
    elif isinstance(item, Scalars):
        log_scalars(trainer, item.values)
    else:
        raise TypeError(f"media() returned {type(item).__name__}; expected Table, Images, Heatmap or Scalars")


def _first_rows(batch: Any, n: int) -> Any:
    """The first n samples of a batch, on the CPU (kept until validation ends)."""
    if isinstance(batch, Tensor):
        return batch[:n].cpu()
    if isinstance(batch, dict):
        return {k: _first_rows(v, n) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_first_rows(v, n) for v in batch) if not isinstance(batch, str) else batch
    return batch
