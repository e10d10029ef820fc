"""Loading checkpoints safely: `torch.load(weights_only=True)` only, the task class resolved from our own metadata
and only if it is a polyformer task, the model rebuilt from the stored hyperparameters."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pickle
import re
import typing
from pathlib import Path
from typing import Any, TypeVar

import torch

from polyformer.tasks.base import TaskModule

T = TypeVar("T", bound=TaskModule)


class CheckpointError(ValueError):
    pass


def read_checkpoint(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """`torch.load(weights_only=True)` with one clear error per way a file can be wrong. Never unpickles objects:
    a file that holds anything but tensors and plain values (e.g. a pickle crafted to run code) is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except RuntimeError as e:
        if mmap and "mmap" in str(e):  # torch's older, non-zip format cannot be mapped: read it whole instead
            return read_checkpoint(path, map_location)
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated or corrupt?): {_first_line(e)}"
        ) from None
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path}: it holds objects other than tensors and plain values, which could run code "
            f"when unpickled ({_first_line(e)}). Only load checkpoints from sources you trust."
        ) from None
    except (EOFError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated or corrupt?): {_first_line(e)}"
        ) from None


def _first_line(e: BaseException) -> str:
    # torch's unpickling errors run to a page of advice about weights_only=False, which is exactly what not to do;
    # the one line worth showing names the refused object ("Unsupported global: GLOBAL io.open ...").
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(e).splitlines()]
    lines = [line for line in lines if line]
    named = [line for line in lines if "WeightsUnpickler error" in line]
    return (named or lines or [type(e).__name__])[0].split(". Please use")[0][:300]


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Read a Lightning checkpoint without unpickling arbitrary objects (mmap: map the tensors, don't read them)."""
    ckpt = read_checkpoint(path, mmap=mmap)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    return ckpt


def build_from_hparams(cls: type[T], hparams: dict[str, Any]) -> T:
    """Call the task's constructor, turning stored dicts back into the dataclasses its signature asks for."""
    hints = typing.get_type_hints(cls.__init__)
    params = inspect.signature(cls.__init__).parameters
    kwargs = {}
    for name, value in hparams.items():
        if name not in params or name.startswith("_"):
            continue
        hint = hints.get(name)
        for candidate in typing.get_args(hint) or (hint,):  # X | None -> try X
            if dataclasses.is_dataclass(candidate) and isinstance(value, dict):
                value = _dataclass_from_dict(candidate, value)
                break
        kwargs[name] = value
    return cls(**kwargs)


def _dataclass_from_dict(cls: type, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        v = values[f.name]
        if dataclasses.is_dataclass(hints.get(f.name)) and isinstance(v, dict):
            v = _dataclass_from_dict(hints[f.name], v)
        elif isinstance(v, list) and "tuple" in str(hints.get(f.name)):
            v = tuple(v)
        kwargs[f.name] = v
    return cls(**kwargs)


def load_task(path: str | Path, expected: type[T] = TaskModule) -> T:
    """Rebuild the task a checkpoint was saved from and load its weights, for inference and fine-tuning."""
    ckpt = load_checkpoint(path)
    meta = ckpt.get("polyformer")
    if not isinstance(meta, dict) or "task" not in meta:
        raise CheckpointError(f"{path} is not a polyformer checkpoint (no 'polyformer' metadata)")
    module_name, _, cls_name = meta["task"].rpartition(".")
    if not module_name.startswith("polyformer."):
        raise CheckpointError(f"{path} names task {meta['task']!r}, which is not a polyformer task; refusing it")
    cls = getattr(importlib.import_module(module_name), cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, TaskModule)):
        raise CheckpointError(f"{path} names task {meta['task']!r}, which is not a polyformer task; refusing it")
    if not issubclass(cls, expected):
        raise CheckpointError(f"{path} is a {cls.__name__} checkpoint; this command needs a {expected.__name__}")
    task = build_from_hparams(cls, meta["hyper_parameters"])
    task.on_load_checkpoint(ckpt)  # checks the architecture; tasks restore what they keep beside the weights
    task.configure_model()
    task.load_state_dict(ckpt["state_dict"])
    return task.eval()
