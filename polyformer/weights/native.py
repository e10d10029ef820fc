"""polyformer's own portable export: a model's weights in safetensors beside the config that rebuilds it, readable
without Lightning, the training stack or a checkpoint.

    out/model.safetensors   the model's state dict (tied weights stored once: `safetensors.torch.save_model`)
    out/config.json         {"format": 1, "model": "polyformer.models.gpt.GPT", "config": {...GPTConfig...}}
    out/tokenizer.json      the tokenizer, when the task has one (translation: target; source_tokenizer.json if apart)

`load_model(out)` rebuilds the plain model (`polyformer.models`) from config.json and loads the weights; a task starts
from them with `--model.init_from=out/model.safetensors` (or the folder). safetensors rather than a pickle: loading
runs no code, and the file memory-maps. Every model is covered, the encoder-decoder too, which has no foreign format
whose layout matches it (sinusoidal positions and pre-LN stacks are neither Marian's nor T5's).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

if TYPE_CHECKING:
    from polyformer.data.tokenizers import Tokenizer

NATIVE_FORMAT = 1
WEIGHTS, CONFIG = "model.safetensors", "config.json"


def model_path(model: nn.Module) -> str:
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


def export_safetensors(
    model: nn.Module, out_dir: Path, tokenizer: Tokenizer | None = None, source_tokenizer: Tokenizer | None = None
) -> Path:
    """Write `model` (a `polyformer.models` network with a dataclass `cfg`) and its tokenizers into `out_dir`."""
    from safetensors.torch import save_model

    from polyformer.plain_data import to_primitive

    cfg = getattr(model, "cfg", None)
    if not model_path(model).startswith("polyformer.models.") or cfg is None:
        raise ValueError(f"only polyformer.models networks export to safetensors, not {model_path(model)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # save_model, not save_file: it drops the second name of a shared tensor (the tied head), which save_file refuses.
    save_model(model, str(out_dir / WEIGHTS), metadata={"format": "pt"})
    config = {"format": NATIVE_FORMAT, "model": model_path(model), "config": to_primitive(cfg)}
    (out_dir / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        (out_dir / "tokenizer.json").write_text(tokenizer.to_json())
    if source_tokenizer is not None and source_tokenizer is not tokenizer:
        (out_dir / "source_tokenizer.json").write_text(source_tokenizer.to_json())
    return out_dir


def read_config(folder: Path) -> tuple[type[nn.Module], Any]:
    """The model class and its config dataclass named by `folder/config.json` (only classes of polyformer.models)."""
    from polyformer.plain_data import dataclass_from_dict

    path = Path(folder) / CONFIG
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} not found: export a model with `polyformer export --format safetensors`"
        ) from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != NATIVE_FORMAT or not isinstance(meta.get("model"), str):
        raise ValueError(f"{path} is not a polyformer export of format {NATIVE_FORMAT} (keys 'format', 'model')")
    module_name, _, cls_name = meta["model"].rpartition(".")
    if not module_name.startswith("polyformer.models."):  # never import a module a file names, beyond our models
        raise ValueError(f"{path} names {meta['model']!r}, which is not a polyformer model; refusing it")
    cls = getattr(importlib.import_module(module_name), cls_name, None)
    config_cls = _config_class(cls)
    if config_cls is None:
        raise ValueError(f"{path} names {meta['model']!r}, which is not a polyformer model; refusing it")
    return cls, dataclass_from_dict(config_cls, meta["config"])


def _config_class(cls: Any) -> type | None:
    """The dataclass a model's constructor takes (`GPT(cfg: GPTConfig)`), from its annotation."""
    import dataclasses
    import typing

    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        return None
    hint = typing.get_type_hints(cls.__init__).get("cfg")
    return hint if dataclasses.is_dataclass(hint) else None


def load_model(folder: str | Path) -> nn.Module:
    """The plain model exported to `folder` by `export_safetensors`, in eval mode, on the CPU."""
    cls, cfg = read_config(Path(folder))
    model = cls(cfg)
    model.load_state_dict(read_weights(Path(folder) / WEIGHTS, model), strict=True)
    return model.eval()


def read_weights(path: Path, model: nn.Module) -> dict[str, Tensor]:
    """A safetensors file as `model`'s full state dict: names a tied weight was saved under stand for all of them."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    stored = load_file(str(path))
    state: dict[str, Tensor] = {}
    # save_model kept one name per shared storage; every name of the model that shares it takes the same tensor.
    by_storage: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        by_storage.setdefault(tensor.untyped_storage().data_ptr(), []).append(name)
    for names in by_storage.values():
        present = [n for n in names if n in stored]
        for name in names:
            if present:
                state[name] = stored[present[0]]
    missing = sorted(set(model.state_dict()) - set(state))
    if missing:
        raise ValueError(f"{path} does not fit this model: no weights for {', '.join(missing[:8])}")
    return state
