"""Dashboard media after validation: what a model learned, not just its loss curve.

The task says what to show through one typed method, `TaskModule.media(batch, request) -> list[Table | Images |
Heatmap | Scalars]` (`polyformer.tasks.media`), given the first rows of the first validation batch; this callback
renders those items and logs them, and knows no task. What each task shows is documented on its `media` method:
LM samples, translations with sentence BLEU and the corpus signature, the confusion matrix and misclassified
images, CLIP's similarity matrix, zero-shot accuracy per class and retrieval examples.

For any task it also logs the attention maps of the first validation example, per layer and head (recomputed from
hooked inputs of the task's model, `polyformer.callbacks.attention_maps`: the backbone keeps no weights). An image
tower that a task describes with an `AttentionOverlay` (its module path, patch size, pooling token) gets the
pooling token's attention over the patch grid and the attention rollout drawn over the images instead
(`polyformer.callbacks.attention_rollout`); the callback learns the layout from that item, never from the task.

Everything runs on global rank 0 only and calls no collective: other ranks do no extra work. Media go to W&B as
tables and images, to TensorBoard as text and images; other loggers get the scalar parts only.

A fit whose last training steps were not followed by a validation (no validation at all, or none since) logs the
media once more at fit end, from the first batch of the validation data, else the training data: a short LM run
shows its samples. That pass records no attention (it would need the task's forward pass) and is skipped when the
strategy shards parameters (FSDP, DeepSpeed stage 3, model parallel): media() may run the model (LM sampling), and a
forward pass on rank 0 alone would wait forever for the other ranks' shards.
"""

from __future__ import annotations

import os
import re
import textwrap
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from polyformer.callbacks.attention_maps import AttentionRecorder
from polyformer.callbacks.attention_rollout import attention_rollout, heat_overlay, patch_map
from polyformer.tasks.base import TaskModule
from polyformer.tasks.media import AttentionOverlay, Heatmap, Images, Media, MediaRequest, Scalars, Table

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
    row_images: Sequence[Tensor] | None = None,
) -> Image:
    """The matrix with a colour bar; `row_images` are drawn as thumbnails in a strip left of the rows, one a row,
    in place of the row labels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = np.asarray(matrix.float().cpu() if isinstance(matrix, Tensor) else matrix, dtype=float)
    side = min(12.0, 3.0 + 0.35 * max(m.shape))
    fig = Figure(figsize=(side, side * 0.85), dpi=80)
    ax = fig.subplots()
    im = ax.imshow(m, cmap="viridis")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if row_images is not None:  # the thumbnails are the row labels
        ylabels = None
        ax.set(yticks=[], ylabel="")
    for labels, ticks, set_labels in ((xlabels, ax.set_xticks, ax.set_xticklabels),
                                      (ylabels, ax.set_yticks, ax.set_yticklabels)):  # fmt: skip
        if labels is not None:
            ticks(range(len(labels)))
            set_labels([s[:30] for s in labels], fontsize=7, rotation=90 if set_labels == ax.set_xticklabels else 0)
    if annotate:
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=6, color="w" if v < m.max() / 2 else "k")
    picture = _render(fig, FigureCanvasAgg)
    if row_images is None:
        return picture
    # Rows' pixel extents from the drawn axes (display y runs upwards, array rows downwards).
    to_px = lambda y: picture.shape[0] - ax.transData.transform((0, y))[1]  # noqa: E731
    strip = thumbnail_strip(row_images, [(to_px(r - 0.5), to_px(r + 0.5)) for r in range(m.shape[0])], len(picture))
    # Right beside the matrix: into the figure's left margin, widened by what the strip needs beyond it.
    left = int(ax.get_window_extent().x0) - strip.shape[1]
    if left < 0:
        picture = np.concatenate([np.full_like(picture[:, :-left], 255), picture], axis=1)
        left = 0
    picture[:, left : left + strip.shape[1]] = np.minimum(picture[:, left : left + strip.shape[1]], strip)
    return picture


def thumbnail_strip(images: Sequence[Tensor], rows: Sequence[tuple[float, float]], height: int) -> Image:
    """A white (height, w, 3) strip with images[i] shrunk into the square cell of pixel rows rows[i] (top, bottom)."""
    side = max(4, int(min(bottom - top for top, bottom in rows)) - 2)
    strip = np.full((height, side + 6, 3), 255, dtype=np.uint8)
    for image, (top, bottom) in zip(images, rows):
        thumb = resize(to_image(image, min_side=1), side)
        y = int(round((top + bottom) / 2 - side / 2))
        strip[max(0, y) : y + side, 2 : 2 + side] = thumb[max(0, -y) : height - y]
    return strip


def resize(image: Image, side: int) -> Image:
    """(H, W, 3) uint8 -> (side, side, 3): area averaging to shrink, nearest pixels to enlarge (crisp digits)."""
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(side, side), mode="area" if side < min(image.shape[:2]) else "nearest")
    return x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


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


def overlay_figure(
    images: Sequence[Image],
    maps: dict[str, Tensor],
    title: str,
    row_labels: Sequence[str] | None = None,
    image_column: bool = True,
) -> Image:
    """One row per image: the image (unless `image_column` is false), then each map over it, each scaled to its own
    range. maps: column title -> (rows, gh, gw)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    titles = (["image"] if image_column else []) + list(maps)
    n, cols, cell = len(images), len(titles), 1.4
    fig = Figure(figsize=(cell * cols + 0.5, cell * n + 0.6), dpi=90)
    axes = fig.subplots(n, cols, squeeze=False)
    for r, image in enumerate(images):
        cells = ([image] if image_column else []) + [heat_overlay(image, m[r]) for m in maps.values()]
        for c, picture in enumerate(cells):
            ax = axes[r, c]
            ax.imshow(picture, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=9)
        if row_labels is not None:
            axes[r, 0].set_ylabel(row_labels[r][:22], fontsize=8)
    fig.suptitle(textwrap.fill(title, width=int(fig.get_figwidth() * 11)), fontsize=10)  # narrow grids wrap it
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


def attention_overlays(
    item: AttentionOverlay, means: dict[str, Tensor], heads: dict[str, Tensor], layers: list[int] | None = None
) -> dict[str, Image]:
    """The figures of an `AttentionOverlay` from recorded weights (`AttentionRecorder.means` / `.heads`): "" -> rows
    = images, columns = the image, the pooling token's attention in each of `layers` (None = all; mean over heads),
    the rollout through every layer; "_heads" -> image 0, rows = layers, columns = the mean and each recorded head.
    Empty when the stack's weights were not recorded."""

    name = re.compile(rf"{re.escape(item.stack)}\.blocks\.(\d+)\.attn")
    of_stack = lambda maps: {int(m[1]): w.float() for k, w in maps.items() if (m := name.fullmatch(k))}  # noqa: E731

    mean = of_stack(means)
    if not mean:
        return {}
    n = min(len(item.images), *(len(v) for v in mean.values()))
    grid = (item.images[0].shape[-2] // item.patch_size, item.images[0].shape[-1] // item.patch_size)
    query = lambda w: patch_map(w, item.prefix, grid, item.query)  # noqa: E731  (rows, T, T) -> (rows, gh, gw)
    shown = [to_image(x, min_side=112) for x in item.images[:n]]
    pooled = "class token" if item.query is not None else "mean of the patches"
    maps = {f"layer {i}": query(mean[i][:n]) for i in sorted(mean) if layers is None or i in layers}
    if sorted(mean) == list(range(len(mean))):  # rollout needs every layer
        maps["rollout"] = query(attention_rollout([mean[i][:n] for i in sorted(mean)]))
    title = f"{item.stack}: attention of the {pooled} over the patches in each layer (mean over heads) and rolled out"
    figures = {"": overlay_figure(shown, maps, title, item.captions)}
    per_head = {i: v for i, v in of_stack(heads).items() if i in mean and (layers is None or i in layers)}
    if per_head:
        order = sorted(per_head)
        columns = {"mean of heads": query(torch.stack([mean[i][0] for i in order]))}
        for h in range(min(len(v) for v in per_head.values())):
            columns[f"head {h}"] = query(torch.stack([per_head[i][h] for i in order]))
        labels = [f"layer {i}" for i in order]
        figures["_heads"] = overlay_figure(
            [shown[0]] * len(order), columns, f"{item.stack}, image 0: {pooled} attention per head", labels
        )
    return figures


def shards_parameters(strategy: Strategy) -> bool:
    """Whether a forward pass needs every rank (parameters sharded across them)."""
    if isinstance(strategy, DeepSpeedStrategy):
        return strategy.zero_stage_3
    return isinstance(strategy, (FSDPStrategy, ModelParallelStrategy))


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
        attention: log attention maps of the first validation example (and overlays of image towers).
        attention_layers, attention_heads: which layers / heads (None = all layers, the first `max_heads` heads).
        max_attention_tokens: crop maps to the first positions, so long sequences stay readable.
        overlay_images: images of an attention overlay (rows of the figure).
        overlay_heads: also draw the first heads of an overlay separately, for image 0 (0 = only their mean).
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
        overlay_images: int = 4,
        overlay_heads: int = 0,
    ) -> None:
        if every_n_val < 0 or num_samples < 1:
            raise ValueError(f"media.every_n_val must be >= 0 and num_samples >= 1, got {every_n_val}, {num_samples}")
        if overlay_images < 1 or overlay_heads < 0:
            raise ValueError(f"media.overlay_images must be >= 1 and overlay_heads >= 0, got {overlay_images}, "
                             f"{overlay_heads}")  # fmt: skip
        self.every_n_val = every_n_val
        self.request = MediaRequest(num_samples, list(prompts or []), max_new_tokens, temperature, top_k,
                                    similarity_size, overlay_images)  # fmt: skip
        self.attention, self.attention_layers, self.attention_heads = attention, attention_layers, attention_heads
        self.max_heads, self.max_attention_tokens, self.overlay_heads = max_heads, max_attention_tokens, overlay_heads
        self.validations = 0
        self._logged_step: int | None = None  # the global step media were last logged at (fit end skips if current)
        self._active = False
        self._recorder: AttentionRecorder | None = None
        self._batch: Any = None
        self._attention: AttentionRecorder | None = None  # the first validation batch's, hooks removed

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
        self._batch, self._attention = None, None

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._active and self.attention and batch_idx == 0 and dataloader_idx == 0:
            model = pl_module.model if isinstance(pl_module, TaskModule) else pl_module
            self._recorder = AttentionRecorder(
                model, self.max_attention_tokens, examples=self.request.overlay_images, heads=self.overlay_heads
            )

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
            self._attention, self._recorder = self._recorder, None
        if self._active and batch_idx == 0 and dataloader_idx == 0:
            self._batch = _first_rows(batch, self._rows())

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After the task's on_validation_epoch_end, so its confusion matrix, BLEU signature etc. are up to date.
        if not self._active:
            return
        self._active = False
        if self._batch is not None:
            self._log_media(trainer, pl_module, self._batch, self._attention)
        self._batch, self._attention = None, None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not (self.every_n_val and trainer.is_global_zero and media_loggers(trainer)):
            return
        if self._logged_step is not None and self._logged_step >= trainer.global_step:
            return  # the last validation already showed the final model
        if shards_parameters(trainer.strategy):
            rank_zero_info("TaskMedia: no media at fit end under a strategy that shards parameters (see its docs)")
            return
        batch = _first_batch(trainer)
        was_training = pl_module.training
        pl_module.eval()
        try:
            self._log_media(trainer, pl_module, None if batch is None else _first_rows(batch, self._rows()), None)
        finally:
            pl_module.train(was_training)

    def _rows(self) -> int:
        r = self.request
        return max(r.num_samples, r.similarity_size, r.overlay_images)

    def _log_media(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, attention: AttentionRecorder | None
    ) -> None:
        """The task's media, then the token x token attention grids of the stacks no overlay has drawn."""
        overlaid: set[str] = set()
        if isinstance(pl_module, TaskModule):
            with torch.no_grad():
                for item in pl_module.media(batch, self.request):
                    if isinstance(item, AttentionOverlay):
                        overlaid.add(item.stack)
                        if attention is not None:
                            figures = attention_overlays(item, attention.means, attention.heads, self.attention_layers)
                            for suffix, image in figures.items():
                                log_images(trainer, f"media/{item.key}{suffix}", [image])
                    else:
                        log_media(trainer, item)
        if attention is not None and attention.maps:
            groups = group_attention(attention.maps, self.attention_layers, self.attention_heads, self.max_heads)
            for key, maps in groups.items():
                if key.rsplit("/", 1)[0] not in overlaid:
                    log_images(
                        trainer, f"media/attention/{key}", [attention_grid(maps, f"attention of example 0: {key}")]
                    )
        self._logged_step = trainer.global_step


def log_media(trainer: pl.Trainer, item: Media) -> None:
    """Render one media item and log it to every logger that shows its kind (an `AttentionOverlay` needs recorded
    weights: `attention_overlays`)."""
    if isinstance(item, Table):
        rows = [[to_image(c) if isinstance(c, Tensor) else c for c in row] for row in item.rows]
        log_table(trainer, f"media/{item.key}", item.columns, rows)
    elif isinstance(item, Images):
        log_images(trainer, f"media/{item.key}", [to_image(x) for x in item.images], item.captions)
    elif isinstance(item, Heatmap):
        image = heatmap(item.matrix, item.title, item.xlabels, item.ylabels, item.annotate, item.xlabel, item.ylabel,
                        item.row_images)  # fmt: skip
        log_images(trainer, f"media/{item.key}", [image])
    elif isinstance(item, Scalars):
        log_scalars(trainer, item.values)
    else:
        raise TypeError(f"media() returned {type(item).__name__}; expected Table, Images, Heatmap or Scalars")


def _first_batch(trainer: pl.Trainer) -> Any:
    """The first batch of the validation data, else of the training data; None if neither has one."""
    for loaders in (trainer.val_dataloaders, trainer.train_dataloader):
        loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
        if loader is None or isinstance(loaders, dict):
            continue
        for batch in loader:
            return batch
    return None


def _first_rows(batch: Any, n: int) -> Any:
    """The first n samples of a batch, on the CPU (kept until validation ends)."""
    if isinstance(batch, Tensor):
        return batch[:n].cpu()
    if isinstance(batch, dict):
        return {k: _first_rows(v, n) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_first_rows(v, n) for v in batch) if not isinstance(batch, str) else batch
    return batch
