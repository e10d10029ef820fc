"""What a task shows on a dashboard, as plain data: `TaskModule.media(batch, request)` returns a list of these and
`polyformer.callbacks.media.TaskMedia` renders and logs them (W&B tables and images, TensorBoard text and images,
scalars to every logger). The callback knows no task; a task knows no logger.

Images are tensors (C, H, W) or (H, W) of any range: the callback scales and enlarges them. A `Table` cell may be
an image tensor too (W&B shows it as an image, TensorBoard as "(image)").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:
    from polyformer.models.image_tower import ImageTower


@dataclass
class Table:
    key: str  # logged as media/<key>
    columns: list[str]
    rows: list[list[Any]]  # str, int, float, or an image Tensor


@dataclass
class Images:
    key: str
    images: list[Tensor]
    captions: list[str] | None = None


@dataclass
class Heatmap:
    """A matrix drawn as an image (confusion matrix, similarity matrix)."""

    key: str
    matrix: Tensor  # (rows, columns)
    title: str
    xlabels: list[str] | None = None
    ylabels: list[str] | None = None
    xlabel: str = ""
    ylabel: str = ""
    annotate: bool = False  # write each cell's value (small integer matrices)
    row_images: list[Tensor] | None = None  # thumbnails drawn left of the rows, one a row, in place of ylabels


@dataclass
class AttentionOverlay:
    """Where an image transformer looks, drawn over the images: for each image a row with the image, the pooling
    token's attention over the patch grid in each layer (mean over heads) and the attention rollout through all
    layers (`polyformer.callbacks.attention_rollout`); optionally a second figure of single heads for image 0.

    The task names the layout, the callback supplies the weights: it records the self-attention of the modules
    `<stack>.blocks.<i>.attn` (names as in the task's model) during the first validation batch, and `images[i]` must
    be row i of the `batch` that media() was given. Without recorded weights (attention off, or media logged at fit
    end without a validation pass) the item is skipped. A stack drawn this way gets no token x token grids."""

    key: str
    images: list[Tensor]  # (C, H, W) as shown; H and W as the model saw them (the grid is H // patch_size, ...)
    stack: str  # the encoder's module path in the task's model, e.g. "tower.encoder"
    patch_size: int
    prefix: int = 1  # tokens before the patches (class token, registers)
    query: int | None = 0  # the pooling token's position; None = the mean of the patch rows (average pooling)
    captions: list[str] | None = None  # one per image, written beside its row


def tower_overlay(
    key: str, tower: ImageTower, stack: str, images: list[Tensor], captions: list[str] | None = None
) -> AttentionOverlay:
    """The overlay of an `ImageTower` held at module path `stack` + ".encoder": its class token (position 0) when it
    pools by one, else the mean of the patch rows."""
    cls = tower.pool == "cls"
    return AttentionOverlay(key, images, f"{stack}.encoder", tower.patch.patch_size, tower.prefix, 0 if cls else None,
                            captions)  # fmt: skip


@dataclass
class Scalars:
    values: dict[str, float]  # logged under these names, at the current step


Media = Table | Images | Heatmap | AttentionOverlay | Scalars


@dataclass
class MediaRequest:
    """How much to show, set on the callback (`--media.*`)."""

    num_samples: int = 8  # rows of sample tables, images of image grids
    prompts: list[str] = field(default_factory=list)  # language models: empty = the task's own or validation starts
    max_new_tokens: int = 32
    temperature: float = 0.8
    top_k: int | None = 50
    similarity_size: int = 16  # images x captions of a similarity matrix
    overlay_images: int = 4  # images of attention overlays
