"""Weights out of polyformer's models into other libraries' formats: `export(model, format, out_dir)`, the inverse of
`load_weights`. The model's type and the format pick the exporter, as the scheme does for loading:
- "hf": a `GPT` as a transformers GPT-2 folder (`AutoModelForCausalLM.from_pretrained(out_dir)`; with a tokenizer,
  `AutoTokenizer.from_pretrained(out_dir)` too);
- "timm": a `ViT` as timm VisionTransformer weights and the `timm.create_model` arguments that build it;
- "open_clip": a `CLIP` as an open_clip state dict and model config;
- "onnx": any of the models as an ONNX graph (`polyformer.weights.onnx`);
- "safetensors": any of the models in polyformer's own layout, weights + the config that rebuilds it + tokenizers
  (`polyformer.weights.native`: `load_model(out_dir)`, or `init_from=<out_dir>/model.safetensors`).

Every exporter first checks that the target can express the model (one ValueError naming every setting to change),
then writes into `out_dir`: created if missing, refused if it holds anything unless `overwrite=True`, each file
written under a temporary name and renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

if TYPE_CHECKING:
    from polyformer.data.tokenizers import Tokenizer

# (format, model class name) -> "module:function" taking (model, out_dir) and returning the folder it wrote.
# The hook for further formats: add entries here (FORMATS and the dispatcher's messages follow the table). Targets
# are import paths, imported only when used, so an entry may name a module that a given install lacks.
EXPORTERS: dict[tuple[str, str], str] = {
    ("hf", "GPT"): "polyformer.weights.gpt2:export_hf_gpt2",
    ("timm", "ViT"): "polyformer.weights.timm_vit:export_timm_vit",
    ("open_clip", "CLIP"): "polyformer.weights.open_clip:export_open_clip",
    **{("onnx", name): "polyformer.weights.onnx:export_onnx" for name in ("GPT", "ViT", "CLIP", "EncoderDecoder")},
    **{
        ("safetensors", name): "polyformer.weights.native:export_safetensors"
        for name in ("GPT", "ViT", "CLIP", "EncoderDecoder", "BertForMaskedLM", "BertForSequenceClassification")
    },
}
FORMATS = tuple(dict.fromkeys(fmt for fmt, _ in EXPORTERS))


def formats_for(model: nn.Module) -> list[str]:
    """The formats `model` can be exported to, as the table says."""
    return [fmt for fmt, name in EXPORTERS if name == type(model).__name__]


def export(
    model: nn.Module,
    format: str,
    out_dir: str | os.PathLike,
    tokenizer: Tokenizer | None = None,
    overwrite: bool = False,
    source_tokenizer: Tokenizer | None = None,
) -> Path:
    """Write `model` in `format` into `out_dir` (see the module docstring) and return the folder. `tokenizer` (and a
    text-to-text model's `source_tokenizer`) go along where the format has a place for them (transformers folders,
    polyformer's own); `overwrite` allows a non-empty `out_dir`."""
    name = type(model).__name__
    target = EXPORTERS.get((format, name))
    if target is None:
        known = sorted({fmt for fmt, _ in EXPORTERS})
        if format not in known:
            raise ValueError(f"unknown export format {format!r}: the formats are {', '.join(known)}")
        fits = formats_for(model)
        raise ValueError(f"a {name} cannot be exported as {format!r}; it exports to {', '.join(fits) or 'no format'}")
    module, _, function = target.partition(":")
    writer: Callable[..., Path] = getattr(importlib.import_module(module), function)
    params = inspect.signature(writer).parameters
    kwargs: dict[str, Any] = {}
    if tokenizer is not None and "tokenizer" in params:
        # Only where the format keeps one; elsewhere (timm, open_clip, ONNX graphs) the model's users tokenize
        # outside it, so a caller may pass whatever tokenizer the model was trained with.
        kwargs["tokenizer"] = tokenizer
    if source_tokenizer is not None and "source_tokenizer" in params:  # text-to-text with two vocabularies
        kwargs["source_tokenizer"] = source_tokenizer
    if "overwrite" in params:
        kwargs["overwrite"] = overwrite
    else:  # a writer that does not guard its folder itself: the same refusal as everywhere, before it runs
        prepare_out_dir(out_dir, overwrite)
    return writer(model, Path(out_dir), **kwargs)


def prepare_out_dir(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    """`out_dir`, created if missing. A folder that already holds anything is refused unless `overwrite`: an export
    mixed into an older one's files would load as neither."""
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"export folder {path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"export folder {path} exists and is not empty; choose another or pass overwrite=True")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` for a temporary name beside `path`, then rename it to `path`: the rename is atomic within
    a folder, so a concurrent reader sees the old file or the whole new one, never a part."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: Path, value: Any) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n"))


def write_safetensors(path: Path, tensors: dict[str, Tensor]) -> Path:
    """The tensors as a safetensors file, each contiguous and unshared (safetensors refuses shared storage) and
    marked "pt" (transformers refuses files without a format)."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    return write_atomic(path, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))


def refuse(model: str, target: str, wrong: list[str]) -> None:
    """One ValueError naming every setting the target cannot express, with the value it needs (each item in the
    form "model.<key>=<needed> (here <value>)")."""
    if wrong:
        raise ValueError(f"this {model} cannot be exported as {target}: it needs " + ", ".join(wrong))
