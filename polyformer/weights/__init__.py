"""Weights from other places into polyformer's models, one way for every task: `load_weights(model, source)`.

`source` names where the weights come from by scheme, and the model's type picks the converter:
- `path/to/file.ckpt`: a polyformer checkpoint (any task whose model has the same architecture);
- `path/to/model.safetensors`: a polyformer export (`polyformer export --format safetensors`, `weights/native.py`),
  checked against the `config.json` beside it;
- `hf:<hub name | save_pretrained folder>`: transformers weights (GPT-2 into a `GPT`, `CLIPModel` into a `CLIP`,
  BERT into `BertForMaskedLM` / `BertForSequenceClassification`);
- `timm:<model name>[@<weights file>]`: a timm VisionTransformer into a `ViT`;
- `open_clip:<model name>@<pretrained tag | weights file>`: an open_clip CLIP into a `CLIP` (the `@` part is required:
  without it open_clip would build random weights).

Each source's module has `convert_<source>(state_dict, ...) -> (config, state_dict)`, importing no task: the config
is what the source's weights say about the architecture, checked against the model's by `check_fits` (one message
naming every field to change), the state dict is in the model's own keys. Downloads fail offline with a
ConnectionError that says so; a local file or folder always works.
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import Tensor, nn

SCHEMES = ("hf", "timm", "open_clip")

# (scheme, model class name) -> "module:function" taking (name, model) and returning the model's full state dict.
_LOADERS = {
    ("hf", "GPT"): "polyformer.weights.gpt2:load_hf_gpt2",
    ("hf", "CLIP"): "polyformer.weights.open_clip:load_hf_clip",
    ("hf", "BertForMaskedLM"): "polyformer.weights.bert:load_hf_bert",
    ("hf", "BertForSequenceClassification"): "polyformer.weights.bert:load_hf_bert",
    ("open_clip", "CLIP"): "polyformer.weights.open_clip:load_open_clip",
    ("timm", "ViT"): "polyformer.weights.timm_vit:load_timm_vit",
}


def parse_source(source: str) -> tuple[str, str]:
    """The scheme and the name after it: `hf:gpt2` -> ("hf", "gpt2"); `runs/x/last.ckpt` -> ("ckpt", the path)."""
    if source.endswith(".ckpt"):
        return "ckpt", source
    if source.endswith(".safetensors"):
        return "safetensors", source
    scheme, sep, name = source.partition(":")
    if not sep or scheme not in SCHEMES or not name:
        raise ValueError(
            f"init_from={source!r} names no weight source: use a polyformer .ckpt file, a polyformer export's "
            "model.safetensors, hf:<hub name or local "
            "save_pretrained folder> (e.g. hf:gpt2), timm:<model name> (e.g. timm:vit_small_patch16_224) or "
            "open_clip:<model name>@<pretrained tag or file> (e.g. open_clip:ViT-B-32@openai)"
        )
    return scheme, name


def load_weights(model: nn.Module, source: str) -> None:
    """Load `source` (see the module docstring) into `model`, in place; every weight of the model is set."""
    scheme, name = parse_source(source)
    if scheme == "ckpt":
        state = checkpoint_model_state(name)
    elif scheme == "safetensors":
        state = native_model_state(name, model)
    else:
        target = _LOADERS.get((scheme, type(model).__name__))
        if target is None:
            fits = sorted(s for s, cls in _LOADERS if cls == type(model).__name__)
            raise ValueError(
                f"init_from={source!r}: {scheme}: weights cannot initialise a {type(model).__name__}; this model "
                f"takes {', '.join(f'{s}:' for s in fits) or 'no foreign weights'} or a .ckpt"
            )
        module, _, function = target.partition(":")
        state = getattr(importlib.import_module(module), function)(name, model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # missing / unexpected keys or other shapes: the weights are of another model
        detail = " ".join(str(e).split())
        raise ValueError(f"init_from={source!r} does not fit this model: {detail[:600]}") from None


def native_model_state(path: str, model: nn.Module) -> dict[str, Tensor]:
    """The weights of a polyformer export, after its config.json (when beside it) was checked against `model`."""
    import dataclasses
    from pathlib import Path

    from polyformer.plain_data import flatten, to_primitive
    from polyformer.weights.native import model_path, read_config, read_weights

    file = Path(path)
    if (file.parent / "config.json").is_file():
        cls, cfg = read_config(file.parent)
        if model_path(model) != f"{cls.__module__}.{cls.__qualname__}":
            raise ValueError(f"init_from={path!r} holds a {cls.__name__}, not a {type(model).__name__}")
        if dataclasses.is_dataclass(getattr(model, "cfg", None)):
            # Regularisation and the starting temperature may change for fine-tuning; everything else is the shape.
            free = ("dropout", "attention_dropout", "drop_path", "init_logit_scale")
            theirs = {k: v for k, v in flatten(to_primitive(cfg)).items() if k.rsplit(".", 1)[-1] not in free}
            check_fits(flatten(to_primitive(model.cfg)), theirs, path)
    return read_weights(file, model)


def checkpoint_model_state(path: str) -> dict[str, Tensor]:
    """The model weights of a polyformer checkpoint (read safely, upgraded to the current format)."""
    from polyformer.checkpointing.files import load_checkpoint
    from polyformer.checkpointing.metadata import upgrade

    state = upgrade(load_checkpoint(path))["state_dict"]
    return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}


def check_fits(ours: dict[str, Any], theirs: dict[str, Any], source: str) -> None:
    """ValueError naming every config key whose value here differs from what the weights need. Both dicts map
    dotted config keys under `model.` (e.g. "backbone.width") to values; keys only in `ours` are not checked."""
    wrong = [f"--model.{k}={theirs[k]!r} (here {ours[k]!r})" for k in theirs if k in ours and ours[k] != theirs[k]]
    if wrong:
        raise ValueError(f"the weights {source!r} need another architecture: set " + ", ".join(wrong))


def zero_bias(state: dict[str, Tensor], weight_key: str) -> None:
    """Give a bias-free reference layer (CLIP's patch convolution, pre-norm timm ViTs) the zero bias our layer has:
    the same function."""
    bias_key = weight_key.removesuffix("weight") + "bias"
    if weight_key in state and bias_key not in state:
        state[bias_key] = state[weight_key].new_zeros(state[weight_key].shape[0])
