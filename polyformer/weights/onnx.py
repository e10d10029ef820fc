"""ONNX export of polyformer's four models, for onnxruntime and other ONNX runtimes: `export_onnx(model, out_dir)`.

What each model becomes (all graphs take any batch size and, where there is one, any sequence length):
- `GPT`: `model.onnx` (tokens -> logits) and `decoder_step.onnx`, one step of KV-cached decoding (new tokens, their
  positions, the attention mask over past + new positions, each layer's past keys and values -> logits and each
  layer's present keys and values). A past of length 0 makes it the prompt step too.
- `EncoderDecoder`: `encoder.onnx` (source, source padding mask -> memory) and `decoder.onnx`, a KV-cached decoder
  step over the target's self-attention (the inputs of `decoder_step.onnx` plus memory and memory mask). The
  cross-attention keys and values are recomputed from `memory` on every step instead of being cached: exact, one
  small projection of the memory per step and layer more than PyTorch's cache does.
- `ViT`: `model.onnx` (images -> logits).
- `CLIP`: `image_encoder.onnx` and `text_encoder.onnx` (unit-norm embeddings) and `logit_scale.json`.

`export.json` lists the files, every graph's input and output names, dtypes and shapes (symbolic axes by name), the
opset and what a runtime needs to build the past keys and values. It is written last: a folder with an `export.json`
holds a complete export.

Sequence lengths are bounded as in PyTorch: learned and sinusoidal positions index a table of `backbone.max_len`
rows (sinusoidal positions beyond it, which PyTorch computes from the formula, fail in the exported graph). Image
graphs take the image size the model was built for.

onnx, onnxscript and onnxruntime are the optional `export` extra: this module imports without them, and
`export_onnx` says how to install them.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from polyformer.backbone import Cache, Transformer, cache_length
from polyformer.models.clip import CLIP
from polyformer.models.encoder_decoder import EncoderDecoder
from polyformer.models.gpt import GPT
from polyformer.models.vit import ViT

MISSING_EXTRA = "ONNX export needs the export extra: pip install 'polyformer[export]'"
# The exporter's own operator set (torch's onnxscript function library is written for it: no version conversion),
# and old enough for every onnxruntime since 1.14.
OPSET = 18
MANIFEST = "export.json"

# Example sizes traced for the dynamic axes. None is 0 or 1, which torch.export would specialise the axis to.
_BATCH, _SEQ, _PAST = 2, 3, 4


@dataclass
class _Graph:
    """One ONNX file: a module with tensor inputs and outputs, example arguments, names and dynamic axes."""

    file: str
    module: nn.Module
    args: tuple[Any, ...]
    inputs: list[str]
    outputs: list[str]
    # Per argument (in order, lists for list arguments), {axis: name}. Named axes become `Dim.DYNAMIC` (torch.export
    # accepts the bounds the model implies, such as sequence <= max_len, and fails where the model would fix a size)
    # and keep the name in the ONNX file.
    axes: tuple[Any, ...]


@dataclass
class _Export:
    graphs: list[_Graph]
    info: dict[str, Any] = field(default_factory=dict)  # for the manifest: what a runtime needs beyond the graphs
    extra_files: dict[str, Any] = field(default_factory=dict)  # json files beside the graphs


def export_onnx(model: nn.Module, out_dir: Path, overwrite: bool = False) -> Path:
    """Export `model` (a `GPT`, `EncoderDecoder`, `ViT` or `CLIP`) to ONNX files in `out_dir` and return `out_dir`.

    `out_dir` is created; an existing one must be empty unless `overwrite` (then files of the same names are
    replaced, others are left, and `export.json` names the files of this export). Each file is written under a
    temporary name and moved into place, `export.json` last. The model is traced in eval mode on its own device and
    dtype, and left in the mode it was in.
    """
    _require_extra()
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"ONNX export: {out_dir} is a file, not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"ONNX export: {out_dir} is not empty; choose a new folder or pass overwrite=True")
    builders: dict[type[nn.Module], Callable[[Any], _Export]] = {
        GPT: _gpt,
        EncoderDecoder: _encoder_decoder,
        ViT: _vit,
        CLIP: _clip,
    }
    builder = next((b for cls, b in builders.items() if isinstance(model, cls)), None)
    if builder is None:
        names = ", ".join(cls.__name__ for cls in builders)
        raise TypeError(f"ONNX export takes a {names}; got a {type(model).__name__}")

    out_dir.mkdir(parents=True, exist_ok=True)
    # A stale manifest would describe the old files while the new ones are being written.
    (out_dir / MANIFEST).unlink(missing_ok=True)
    was_training = model.training
    model.eval()
    staging = Path(tempfile.mkdtemp(prefix=".onnx-export-", dir=out_dir))
    try:
        with _explicit_masks(model), torch.no_grad():
            spec = builder(model)
            graphs = {g.file: _export_graph(g, staging) for g in spec.graphs}
        files = sorted(p.name for p in staging.iterdir())
        for name, content in spec.extra_files.items():
            _write_json(staging / name, content)
            files.append(name)
        manifest = {
            "model": type(model).__name__,
            "opset": OPSET,
            "torch": torch.__version__,
            "files": sorted([*files, MANIFEST]),
            "graphs": graphs,
            **spec.info,
        }
        for name in files:
            os.replace(staging / name, out_dir / name)
        _write_json(staging / MANIFEST, manifest)
        os.replace(staging / MANIFEST, out_dir / MANIFEST)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        model.train(was_training)
    return out_dir


def _require_extra() -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401  (torch's dynamo exporter builds its graphs with it)
    except ImportError:
        raise ImportError(MISSING_EXTRA) from None


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")


def _export_graph(graph: _Graph, folder: Path) -> dict[str, Any]:
    """Export one graph into `folder`; return its inputs and outputs as the saved file declares them."""
    import onnx

    path = folder / graph.file
    graph.module.eval()  # the wrapper as well as the model (export_onnx restores the model's mode)
    # The torch.export-based exporter (dynamo=True), not the TorchScript one: the TorchScript exporter refuses
    # grouped-query attention (SDPA with enable_gqa) and is deprecated since torch 2.9. The backbone's
    # `is_causal=T > 1` is a symbolic bool under torch.export, which SDPA does not take: `_explicit_masks` gives the
    # causal stacks an all-true padding mask, so they build their mask as a tensor (the same attention).
    with warnings.catch_warnings():
        # Inputs sharing an axis (tokens and positions: batch, seq) share its symbol; torch names it once and warns
        # for every further input: expected here, not a problem.
        warnings.filterwarnings("ignore", message=r"# The axis name: .* will not be used", category=UserWarning)
        program = torch.onnx.export(
            graph.module,
            graph.args,
            input_names=graph.inputs,
            output_names=graph.outputs,
            opset_version=OPSET,
            dynamic_shapes=graph.axes,
            dynamo=True,
            optimize=True,  # constant folding and redundant-node elimination: a smaller, faster graph
            verbose=False,
        )
    before = set(folder.iterdir())
    # Weights beyond 2 GiB (one protobuf's limit) go to a data file beside the graph: torch decides by their size.
    program.save(path, external_data=False)
    model = onnx.load(str(path), load_external_data=False)
    return {
        "inputs": [_describe(v) for v in model.graph.input],
        "outputs": [_describe(v) for v in model.graph.output],
        "weights": sorted(p.name for p in set(folder.iterdir()) - before - {path}),
    }


def _describe(value: Any) -> dict[str, Any]:
    """Name, dtype and shape (ints, and names for dynamic axes) of a graph input or output (an onnx ValueInfoProto)."""
    import onnx

    tensor = value.type.tensor_type
    shape = [d.dim_param or d.dim_value for d in tensor.shape.dim]
    return {"name": value.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name, "shape": shape}


@contextlib.contextmanager
def _explicit_masks(model: nn.Module) -> Iterator[None]:
    """While exporting, a causal `Transformer` called without a padding mask gets an all-true one. Without a mask the
    backbone decides SDPA's `is_causal` from the sequence length, a Python bool in PyTorch but a symbolic one under
    torch.export (which SDPA refuses); with a mask it builds the causal mask as a tensor: the same attention."""
    signature = inspect.signature(Transformer.forward)

    def add_mask(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        bound = signature.bind(module, *args, **kwargs)
        if bound.arguments.get("padding_mask") is None:
            x, cache = bound.arguments["x"], bound.arguments.get("cache")
            length = cache_length(cache) + x.shape[1]  # the mask covers cached and new positions
            bound.arguments["padding_mask"] = torch.ones(x.shape[0], length, dtype=torch.bool, device=x.device)
        return bound.args[1:], bound.kwargs

    causal = [m for m in model.modules() if isinstance(m, Transformer) and m.cfg.causal]
    handles = [m.register_forward_pre_hook(add_mask, with_kwargs=True) for m in causal]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _cache_from(past: list[Tensor]) -> Cache:
    """[key_0, value_0, key_1, value_1, ...] -> the backbone's cache, one {"self": {"k", "v"}} per block."""
    return [{"self": {"k": past[i], "v": past[i + 1]}} for i in range(0, len(past), 2)]


def _flatten(cache: Cache) -> list[Tensor]:
    return [t for block in cache for t in (block["self"]["k"], block["self"]["v"])]


def _past_names(depth: int, prefix: str) -> list[str]:
    return [f"{prefix}_{kind}_{i}" for i in range(depth) for kind in ("key", "value")]


def _step_inputs(stack: Transformer, device: torch.device, dtype: torch.dtype, vocab: int) -> tuple[Any, ...]:
    """Example (tokens, positions, attention mask, past keys and values) of a decoding step after _PAST tokens."""
    cfg = stack.cfg
    kv_heads = cfg.kv_heads or cfg.heads
    tokens = torch.randint(0, vocab, (_BATCH, _SEQ), device=device)
    positions = torch.arange(_PAST, _PAST + _SEQ, device=device).expand(_BATCH, -1)
    mask = torch.ones(_BATCH, _PAST + _SEQ, dtype=torch.bool, device=device)
    past = [
        torch.randn(_BATCH, kv_heads, _PAST, cfg.head_dim, device=device, dtype=dtype) for _ in range(2 * cfg.depth)
    ]
    return tokens, positions, mask, past


_STEP_AXES = ({0: "batch", 1: "seq"}, {0: "batch", 1: "seq"}, {0: "batch", 1: "seq + past"})
_PAST_AXES = {0: "batch", 2: "past"}


def _cache_info(stack: Transformer) -> dict[str, Any]:
    cfg = stack.cfg
    return {
        "layers": cfg.depth,
        "kv_heads": cfg.kv_heads or cfg.heads,
        "head_dim": cfg.head_dim,
        "past_layout": "(batch, kv_heads, past, head_dim) per layer; a past of length 0 starts decoding",
        "attention_mask": "True at real tokens, over past + new positions (bool)",
        "max_len": cfg.max_len if cfg.position in ("learned", "sinusoidal") else None,
    }


class _Call(nn.Module):
    """One method of a model as a module's forward (torch.export traces modules)."""

    def __init__(self, model: nn.Module, method: str) -> None:
        super().__init__()
        self.model, self.method = model, method

    def forward(self, x: Tensor) -> Tensor:
        return getattr(self.model, self.method)(x)


class _GPTStep(nn.Module):
    """The dict cache as explicit tensors: past keys and values in, present ones (past + new positions) out."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, tokens: Tensor, positions: Tensor, attention_mask: Tensor, past: list[Tensor]
    ) -> tuple[Tensor, list[Tensor]]:
        cache = _cache_from(past)  # the blocks extend these dicts in place (attention.py)
        logits = self.model(tokens, padding_mask=attention_mask, positions=positions, cache=cache)
        return logits, _flatten(cache)


def _gpt(model: GPT) -> _Export:
    weight = model.embed.weight
    depth, vocab = model.cfg.backbone.depth, model.cfg.vocab_size
    step_args = _step_inputs(model.backbone, weight.device, weight.dtype, vocab)
    full = _Graph(
        "model.onnx",
        _Call(model, "forward"),
        (torch.randint(0, vocab, (_BATCH, _SEQ + _PAST), device=weight.device),),
        ["tokens"],
        ["logits"],
        ({0: "batch", 1: "seq"},),
    )
    step = _Graph(
        "decoder_step.onnx",
        _GPTStep(model),
        step_args,
        ["tokens", "positions", "attention_mask", *_past_names(depth, "past")],
        ["logits", *_past_names(depth, "present")],
        (*_STEP_AXES, [_PAST_AXES] * (2 * depth)),
    )
    return _Export([full, step], {"vocab_size": vocab, "cache": _cache_info(model.backbone)})


class _Encoder(nn.Module):
    def __init__(self, model: EncoderDecoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, source: Tensor, source_padding_mask: Tensor) -> Tensor:
        return self.model.encode(source, source_padding_mask)


class _DecoderStep(nn.Module):
    """A decoder step on explicit self-attention keys and values. The cache handed to the model holds no
    cross-attention entry, so every step computes those keys and values from `memory` (PyTorch keeps them)."""

    def __init__(self, model: EncoderDecoder) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        tokens: Tensor,
        positions: Tensor,
        attention_mask: Tensor,
        memory: Tensor,
        memory_mask: Tensor,
        past: list[Tensor],
    ) -> tuple[Tensor, list[Tensor]]:
        cache = _cache_from(past)
        logits = self.model.decode(tokens, memory, memory_mask, attention_mask, positions, cache=cache)
        return logits, _flatten(cache)


def _encoder_decoder(model: EncoderDecoder) -> _Export:
    weight = model.target_embed.weight
    device, cfg = weight.device, model.cfg
    source_len = _SEQ + 2  # another example length than the target's: the two axes stay apart
    source = torch.randint(0, cfg.source_vocab_size, (_BATCH, source_len), device=device)
    source_mask = torch.ones(_BATCH, source_len, dtype=torch.bool, device=device)
    encoder = _Graph(
        "encoder.onnx",
        _Encoder(model),
        (source, source_mask),
        ["source", "source_padding_mask"],
        ["memory"],
        ({0: "batch", 1: "source_seq"}, {0: "batch", 1: "source_seq"}),
    )
    tokens, positions, mask, past = _step_inputs(model.decoder, device, weight.dtype, cfg.vocab_size)
    memory = torch.randn(_BATCH, source_len, cfg.backbone.width, device=device, dtype=weight.dtype)
    depth = model.decoder.cfg.depth
    decoder = _Graph(
        "decoder.onnx",
        _DecoderStep(model),
        (tokens, positions, mask, memory, source_mask, past),
        ["tokens", "positions", "attention_mask", "memory", "memory_mask", *_past_names(depth, "past")],
        ["logits", *_past_names(depth, "present")],
        (*_STEP_AXES, {0: "batch", 1: "source_seq"}, {0: "batch", 1: "source_seq"}, [_PAST_AXES] * (2 * depth)),
    )
    info = {
        "vocab_size": cfg.vocab_size,
        "source_vocab_size": cfg.source_vocab_size,
        "cache": _cache_info(model.decoder),
    }
    return _Export([encoder, decoder], info)


def _example_images(device: torch.device, dtype: torch.dtype, channels: int, size: int) -> Tensor:
    return torch.randn(_BATCH, channels, size, size, device=device, dtype=dtype)


def _vit(model: ViT) -> _Export:
    cfg, weight = model.cfg, model.head.weight
    images = _example_images(weight.device, weight.dtype, cfg.channels, cfg.image_size)
    graph = _Graph("model.onnx", _Call(model, "forward"), (images,), ["images"], ["logits"], ({0: "batch"},))
    return _Export([graph], {"num_classes": cfg.num_classes, "image_size": cfg.image_size})


def _clip(model: CLIP) -> _Export:
    cfg, weight = model.cfg, model.image_proj.weight
    images = _example_images(weight.device, weight.dtype, cfg.image.channels, cfg.image.image_size)
    tokens = torch.randint(0, cfg.vocab_size, (_BATCH, _SEQ + _PAST), device=weight.device)
    image = _Graph(
        "image_encoder.onnx", _Call(model, "encode_image"), (images,), ["images"], ["image_embeds"], ({0: "batch"},)
    )
    text = _Graph(
        "text_encoder.onnx",
        _Call(model, "encode_text"),
        (tokens,),
        ["tokens"],
        ["text_embeds"],
        ({0: "batch", 1: "seq"},),
    )
    # The similarity a runtime computes: logit_scale * image_embeds @ text_embeds.T (the value PyTorch uses, capped).
    scale = {"logit_scale": float(model.scale())}
    info = {"embed_dim": cfg.embed_dim, "image_size": cfg.image.image_size, "eos_id": cfg.eos_id, **scale}
    return _Export([image, text], info, {"logit_scale.json": scale})
