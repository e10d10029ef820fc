"""`DataInfo`: what a data module tells the task it feeds, in one typed value instead of attributes read by name.

Every polyformer data module has `info() -> DataInfo`, complete once `setup()` has run (tokenizers are trained or
loaded there). A task takes from it what its model needs (`TaskModule.connect_data`): sizes the model is built with
(vocabulary, classes, image size), tokenizers for decoding, and what it stores beside the weights for inference
(class names, prompts, normalisation). A field a data module does not know stays None.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from torch import Tensor

if TYPE_CHECKING:
    from polyformer.data.tokenizers import Tokenizer


@dataclass(frozen=True)
class DataInfo:
    tokenizer: Tokenizer | None = None  # target side for text-to-text
    source_tokenizer: Tokenizer | None = None  # text-to-text: the source side (the same object under a joint BPE)
    vocab_size: int | None = None
    source_vocab_size: int | None = None
    eos_id: int | None = None
    block_size: int | None = None  # language modelling: positions per training block
    num_classes: int | None = None
    class_names: tuple[str, ...] | None = None
    prompts: tuple[str, ...] | None = None  # zero-shot templates, "{}" = class name
    image_size: int | None = None
    channels: int | None = None
    mean: tuple[float, ...] | None = None  # the images' normalisation
    std: tuple[float, ...] | None = None
    denormalize: Callable[[Tensor], Tensor] | None = None  # model inputs (B, C, H, W) back to uint8 pixels


@runtime_checkable
class ProvidesDataInfo(Protocol):
    def info(self) -> DataInfo: ...
