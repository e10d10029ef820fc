"""`load_task`: rebuild the task a checkpoint was saved from, for inference and fine-tuning. Safely: the file is read
with `torch.load(weights_only=True)` only, the task class is resolved from our own metadata and only if it is a
polyformer task, and the model is rebuilt from the stored hyperparameters.

`polyformer.tasks` is imported when a task is loaded, not when this module is: the tasks import the checkpointing
package themselves (their metadata), and a command that only reads files should not pay for every task.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from polyformer.checkpointing.files import CheckpointError, load_checkpoint
from polyformer.checkpointing.metadata import upgrade
from polyformer.plain_data import dataclass_from_dict

if TYPE_CHECKING:
    from polyformer.tasks.base import TaskModule

T = TypeVar("T", bound="TaskModule")


def build_from_hparams(cls: type[T], hparams: dict[str, Any]) -> T:
    """Call the task's constructor, turning stored dicts back into the dataclasses its signature asks for."""
    hints = typing.get_type_hints(cls.__init__)
    params = inspect.signature(cls.__init__).parameters
    kwargs = {}
    for name, value in hparams.items():
        # init_from: the checkpoint's own weights replace the initial ones, which are not fetched again.
        if name not in params or name.startswith("_") or name == "init_from":
            continue
        hint = hints.get(name)
        for candidate in typing.get_args(hint) or (hint,):  # X | None -> try X
            if dataclasses.is_dataclass(candidate) and isinstance(value, dict):
                value = dataclass_from_dict(candidate, value)
                break
        kwargs[name] = value
    return cls(**kwargs)


def load_task(path: str | Path, expected: type[T] | None = None) -> T:
    """Rebuild the task a checkpoint was saved from and load its weights, for inference and fine-tuning.
    `expected`: the task class a command needs (a checkpoint of another task is refused); None = any task."""
    from polyformer.tasks.base import TaskModule

    ckpt = upgrade(load_checkpoint(path))
    meta = ckpt.get("polyformer")
    if not isinstance(meta, dict) or "task" not in meta:
        raise CheckpointError(f"{path} is not a polyformer checkpoint (no 'polyformer' metadata)")
    module_name, _, cls_name = meta["task"].rpartition(".")
    if not module_name.startswith("polyformer."):
        raise CheckpointError(f"{path} names task {meta['task']!r}, which is not a polyformer task; refusing it")
    cls = getattr(importlib.import_module(module_name), cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, TaskModule)):
        raise CheckpointError(f"{path} names task {meta['task']!r}, which is not a polyformer task; refusing it")
    expected = expected or TaskModule
    if not issubclass(cls, expected):
        raise CheckpointError(f"{path} is a {cls.__name__} checkpoint; this command needs a {expected.__name__}")
    task = build_from_hparams(cls, meta["hyper_parameters"])
    task.on_load_checkpoint(ckpt)  # checks the architecture; tasks restore what they keep beside the weights
    if not task.build():  # every size is a stored hyperparameter, so the model is normally built by now
        raise CheckpointError(f"{path} lacks the model sizes {task.missing_sizes()} in its hyperparameters")
    task.load_state_dict(ckpt["state_dict"])
    return task.eval()  # type: ignore[return-value]
