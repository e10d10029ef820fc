"""What a task shows on a dashboard, as plain data: `TaskModule.media(batch, request)` returns a list of these and
`polyformer.callbacks.media.TaskMedia` renders and logs them (W&B tables and images, TensorBoard text and images,
scalars to every logger). The callback knows no task; a task knows no logger.

Images are tensors (C, H, W) or (H, W) of any range: the callback scales and enlarges them. A `Table` cell may be
an image tensor too (W&B shows it as an image, TensorBoard as "(image)").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


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


@dataclass
class Scalars:
    values: dict[str, float]  # logged under these names, at the current step


Media = Table | Images | Heatmap | Scalars


@dataclass
class MediaRequest:
    """How much to show, set on the callback (`--media.*`)."""

    num_samples: int = 8  # rows of sample tables, images of image grids
    prompts: list[str] = field(default_factory=list)  # language models: empty = the task's own or validation starts
    max_new_tokens: int = 32
    temperature: float = 0.8
    top_k: int | None = 50
    similarity_size: int = 16  # images x captions of a similarity matrix
