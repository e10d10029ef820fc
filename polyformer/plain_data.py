"""Typed configs to plain data and back: dataclasses as JSON-able dicts (checkpoints, exports' config.json), dotted
flat keys for comparing two configs field by field, and a dataclass rebuilt from such a dict by its type hints.

Standard library only: the checkpoint code (which runs under Lightning) and the plain exports (`weights/native.py`,
which must load without Lightning) both use it.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any


def to_primitive(value: Any) -> Any:
    """Dataclasses, tuples and paths to plain dicts/lists/strings, so checkpoints load with weights_only=True."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_primitive(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_primitive(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_primitive(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to one level of dotted keys: {"backbone": {"width": 8}} -> {"backbone.width": 8}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def dataclass_from_dict(cls: type, values: dict[str, Any]) -> Any:
    """`cls` from a dict of its fields (as `to_primitive` wrote it): nested dataclasses rebuilt by their type hints,
    lists back to tuples where the field is a tuple; fields the dict lacks keep their defaults."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        v = values[f.name]
        if dataclasses.is_dataclass(hints.get(f.name)) and isinstance(v, dict):
            v = dataclass_from_dict(hints[f.name], v)
        elif isinstance(v, list) and "tuple" in str(hints.get(f.name)):
            v = tuple(v)
        kwargs[f.name] = v
    return cls(**kwargs)
