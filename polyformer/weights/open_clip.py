"""CLIP weights from open_clip (Ilharco et al. 2021, github.com/mlfoundations/open_clip: `open_clip.model.CLIP`, the
OpenAI layout) or from Hugging Face `transformers.CLIPModel`, into `polyformer.models.clip.CLIP`.

Both references are pre-LN ViT + causal text transformers like ours; the differences are names and layouts:
open_clip keeps fused `in_proj` (rows q, k, v, as our `qkv`), projections as (width, embed) matrices applied as
x @ proj (our Linear weight is the transpose), a bias-free patch convolution (ours has a bias: zero) and the class
token as a (D,) vector. transformers splits q/k/v.

`convert_open_clip` / `convert_hf_clip` map one state dict to ours and say what its shapes need (widths, depths,
MLP ratio, patch and image size, context length, embedding dim, vocabulary); `open_clip_config` / `hf_clip_config`
add what only the reference model knows: heads, activation (GELU, or QuickGELU for OpenAI's weights), norm eps and
the token the text tower pools at. `load_open_clip` is `init_from="open_clip:<name>@<pretrained tag | weights
file>"`, `load_hf_clip` is `init_from="hf:<hub name | save_pretrained folder>"`.
Covered: ViT image towers with class-token pooling and the standard text tower, and SigLIP's logit bias (open_clip's
`CLIP(init_logit_bias=...)` parameter `logit_bias`: our `loss="siglip"`). Refused with a message: ResNet or timm image
towers, custom (Hugging Face) text towers, attentional pooling, layer scale.
The way out: `export_open_clip` writes a `CLIP` as an open_clip state dict and model config (open_clip's own layout
and the hub's), after `open_clip_export_problems` finds nothing to refuse.
Legend: D width, E embed dim, N patches.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from polyformer.weights import check_fits, zero_bias

if TYPE_CHECKING:
    from polyformer.models.clip import CLIP

_BLOCK = {  # open_clip residual block -> our Block
    "ln_1": "norm1",
    "attn.in_proj_weight": "attn.qkv.weight",
    "attn.in_proj_bias": "attn.qkv.bias",
    "attn.out_proj": "attn.proj",
    "ln_2": "norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_HF_BLOCK = {
    "layer_norm1": "norm1",
    "self_attn.out_proj": "attn.proj",
    "layer_norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_OPEN_CLIP = {
    "visual.conv1.weight": "image.patch.proj.weight",
    "visual.ln_pre": "image.norm_pre",
    "visual.ln_post": "image.encoder.norm",
    "token_embedding.weight": "text.embed.weight",
    "positional_embedding": "text.encoder.positions.weight",
    "ln_final": "text.encoder.norm",
    "logit_scale": "logit_scale",
}
_HF = {
    "vision_model.embeddings.patch_embedding.weight": "image.patch.proj.weight",
    "vision_model.pre_layrnorm": "image.norm_pre",
    "vision_model.post_layernorm": "image.encoder.norm",
    "visual_projection.weight": "image_proj.weight",
    "text_model.embeddings.token_embedding.weight": "text.embed.weight",
    "text_model.embeddings.position_embedding.weight": "text.encoder.positions.weight",
    "text_model.final_layer_norm": "text.encoder.norm",
    "text_projection.weight": "text_proj.weight",
    "logit_scale": "logit_scale",
}

# What every CLIP tower of both references is, whatever its size: pre-LN blocks with biases and a final norm, plain
# multi-head attention; the text tower causal with learned positions (dropout may differ).
_TOWER_LAYOUT = {"backbone.kv_heads": None, "backbone.norm": "layernorm", "backbone.prenorm": True,
                 "backbone.final_norm": True, "backbone.bias": True, "backbone.cross_attention": False,
                 "backbone.window": None}  # fmt: skip
_LAYOUT = {
    **{f"image.{k}": v for k, v in _TOWER_LAYOUT.items()},
    **{f"text.{k}": v for k, v in _TOWER_LAYOUT.items()},
    "image.pool": "cls",
    "text.backbone.position": "learned",
    "text.backbone.causal": True,
}


def _rename(key: str, table: dict[str, str]) -> str | None:
    for old, new in table.items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old) :]
    return None


def _shape_config(out: dict[str, Tensor]) -> dict[str, Any]:
    """The `--model.` keys a converted CLIP state dict (our keys) fixes by its shapes."""
    config: dict[str, Any] = dict(_LAYOUT)
    for tower in ("image", "text"):
        blocks = {k.split(".")[3] for k in out if k.startswith(f"{tower}.encoder.blocks.")}
        width = out[f"{tower}.encoder.norm.weight"].shape[0]
        config[f"{tower}.backbone.width"] = width
        config[f"{tower}.backbone.depth"] = len(blocks)
        config[f"{tower}.backbone.mlp_ratio"] = out[f"{tower}.encoder.blocks.0.mlp.fc1.weight"].shape[0] / width
    patch = out["image.patch.proj.weight"]  # (D, C, p, p)
    side = math.isqrt(out["image.pos_embed"].shape[1] - 1)  # positions: class token + side x side patches
    config.update({
        "image.patch_size": patch.shape[-1],
        "image.channels": patch.shape[1],
        "image.image_size": side * patch.shape[-1],
        "image.norm_pre": "image.norm_pre.weight" in out,
        "text.backbone.max_len": out["text.encoder.positions.weight"].shape[0],
        "embed_dim": out["image_proj.weight"].shape[0],
        "vocab_size": out["text.embed.weight"].shape[0],
    })  # fmt: skip
    return config


def _finish(out: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    zero_bias(out, "image.patch.proj.weight")  # CLIP's patch convolution has no bias; ours is zero: the same function
    out["logit_scale"] = out["logit_scale"].reshape(1)  # ours is (1,): FSDP shards no 0-d parameters
    config = _shape_config(out)
    config["loss"] = "siglip" if "logit_bias" in out else "clip"  # a logit bias is a SigLIP model's
    return config, out


def convert_open_clip(state_dict: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """An open_clip `CLIP` (ViT) state dict -> (the `--model.` keys its shapes need, a `CLIP` state dict)."""
    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}  # open_clip training checkpoints: DDP prefix
    if "visual.conv1.weight" not in sd or "token_embedding.weight" not in sd:
        raise ValueError(
            "not an open_clip CLIP (ViT) state dict: expected 'visual.conv1.weight' and 'token_embedding.weight', got "
            f"keys like {sorted(sd)[:5]} (a transformers CLIPModel goes through convert_hf_clip)"
        )
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if m := re.fullmatch(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)", key):
            if (inner := _rename(m[3], _BLOCK)) is None:
                raise ValueError(f"open_clip key {key!r} (layer scale or a norm our blocks lack) has no counterpart")
            out[f"{'image' if m[1] else 'text'}.encoder.blocks.{m[2]}.{inner}"] = value
        elif key == "visual.class_embedding":
            out["image.patch.cls_token"] = value.reshape(1, 1, -1)  # (D,) -> (1, 1, D)
        elif key == "visual.positional_embedding":
            out["image.pos_embed"] = value.unsqueeze(0)  # (1 + N, D) -> (1, 1 + N, D)
        elif key == "visual.proj":
            out["image_proj.weight"] = value.T  # x @ (D, E) == Linear with weight (E, D)
        elif key == "text_projection":
            out["text_proj.weight"] = value.T
        elif key == "attn_mask":  # the causal mask, a buffer of old checkpoints: ours is built in
            continue
        elif key == "logit_bias":  # SigLIP's b: open_clip's is a 0-d parameter, ours (1,) as the logit scale
            out["logit_bias"] = value.reshape(1)
        elif key.startswith("visual.attn_pool"):
            raise ValueError(f"{key!r} (attentional pooling) has no counterpart in our CLIP")
        elif (new := _rename(key, _OPEN_CLIP)) is not None:
            out[new] = value
        else:
            raise ValueError(f"open_clip key {key!r} has no counterpart in our CLIP (a non-ViT or custom model?)")
    if "image.patch.cls_token" not in out:
        raise ValueError("open_clip ViT without a class token: our CLIP pools the image at its class token")
    return _finish(out)


def convert_hf_clip(state_dict: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A transformers `CLIPModel` state dict -> (the `--model.` keys its shapes need, a `CLIP` state dict)."""
    if "text_model.embeddings.token_embedding.weight" not in state_dict:
        raise ValueError(
            "not a transformers CLIPModel state dict: expected 'text_model.embeddings.token_embedding.weight', got "
            f"keys like {sorted(state_dict)[:5]}"
        )
    out: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, Tensor]] = {}  # our key -> {"q": ..., "k": ..., "v": ...}, fused once all are seen
    for key, value in state_dict.items():
        if key.endswith("position_ids"):  # a buffer of index ranges in older transformers
            continue
        if m := re.fullmatch(r"(vision|text)_model\.encoder\.layers\.(\d+)\.(.+)", key):
            prefix = f"{'image' if m[1] == 'vision' else 'text'}.encoder.blocks.{m[2]}"
            if pm := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", m[3]):
                qkv.setdefault(f"{prefix}.attn.qkv.{pm[2]}", {})[pm[1]] = value
            elif (inner := _rename(m[3], _HF_BLOCK)) is not None:
                out[f"{prefix}.{inner}"] = value
            else:
                raise ValueError(f"transformers CLIPModel key {key!r} has no counterpart in our CLIP")
        elif key == "vision_model.embeddings.class_embedding":
            out["image.patch.cls_token"] = value.reshape(1, 1, -1)
        elif key == "vision_model.embeddings.position_embedding.weight":
            out["image.pos_embed"] = value.unsqueeze(0)
        elif (new := _rename(key, _HF)) is not None:
            out[new] = value
        else:
            raise ValueError(f"transformers CLIPModel key {key!r} has no counterpart in our CLIP")
    for name, parts in qkv.items():
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]])  # rows q, k, v as our fused projection
    return _finish(out)


def _activation(act: nn.Module | str) -> str:
    """Our activation name for an open_clip activation module or a transformers `hidden_act` string."""
    if isinstance(act, str):
        name = {"quick_gelu": "quick_gelu", "gelu": "gelu"}.get(act)
    elif type(act).__name__ == "QuickGELU":
        name = "quick_gelu"
    else:
        name = "gelu" if isinstance(act, nn.GELU) and act.approximate == "none" else None
    if name is None:
        raise ValueError(f"CLIP activation {act!r} is not supported (gelu, quick_gelu)")
    return name


def open_clip_config(model: nn.Module) -> dict[str, Any]:
    """The `--model.` keys an open_clip `CLIP` (ViT) fixes beyond its shapes: heads, activation, norm eps, and the
    token its text tower pools at ('argmax' pooling is the highest id: OpenAI's end-of-text, vocab_size - 1)."""
    visual = model.visual
    if not hasattr(visual, "conv1") or not hasattr(model, "token_embedding"):
        raise ValueError(f"open_clip {type(model).__name__} with a {type(visual).__name__} image tower is not a ViT "
                         "CLIP with the standard text tower; only those load into polyformer's CLIP")  # fmt: skip
    if getattr(visual, "pool_type", "tok") != "tok" or getattr(visual, "attn_pool", None) is not None:
        raise ValueError(f"open_clip image pooling {visual.pool_type!r} is not supported (class token only)")
    pool = model.text_pool_type
    if pool == "argmax":
        eos_id = model.vocab_size - 1
    elif pool == "eos":
        eos_id = model.text_eos_id
    else:
        raise ValueError(f"open_clip text pooling {pool!r} is not supported (argmax or eos)")
    config: dict[str, Any] = {"eos_id": eos_id}
    for tower, blocks in (("image", visual.transformer.resblocks), ("text", model.transformer.resblocks)):
        config[f"{tower}.backbone.heads"] = blocks[0].attn.num_heads
        config[f"{tower}.backbone.activation"] = _activation(blocks[0].mlp.gelu)
        config[f"{tower}.backbone.norm_eps"] = blocks[0].ln_1.eps
    return config


def hf_clip_config(config: Any) -> dict[str, Any]:
    """The `--model.` keys a transformers `CLIPConfig` fixes beyond the shapes: heads, activation, norm eps, and the
    token the text tower pools at (`eos_token_id`; the legacy value 2 means the highest id, as open_clip's argmax)."""
    text, vision = config.text_config, config.vision_config
    return {
        "image.backbone.heads": vision.num_attention_heads,
        "image.backbone.activation": _activation(vision.hidden_act),
        "image.backbone.norm_eps": vision.layer_norm_eps,
        "text.backbone.heads": text.num_attention_heads,
        "text.backbone.activation": _activation(text.hidden_act),
        "text.backbone.norm_eps": text.layer_norm_eps,
        "eos_id": text.vocab_size - 1 if text.eos_token_id == 2 else text.eos_token_id,
    }


def model_config(model: CLIP) -> dict[str, Any]:
    """A CLIP's config as the dotted `--model.` keys `check_fits` compares."""

    def flat(value: Any, prefix: str) -> dict[str, Any]:
        if dataclasses.is_dataclass(value):
            return {
                k: v
                for f in dataclasses.fields(value)
                for k, v in flat(getattr(value, f.name), f"{prefix}{f.name}.").items()
            }
        return {prefix.removesuffix("."): value}

    return flat(model.cfg, "")


def load_open_clip(name: str, model: CLIP) -> dict[str, Tensor]:
    """`init_from="open_clip:<name>@<tag or file>"`: the open_clip model `name` (e.g. ViT-B-32) with the weights of a
    pretrained tag (e.g. openai, laion2b_s34b_b79k: fetched once from the hub, then cached) or of a local file, as
    `model`'s complete state dict, after checking that `model` has that architecture (every differing key named at
    once). A tag trained with QuickGELU (OpenAI's) builds the model with it; a file gets the activation of `name`
    (name the -quickgelu variant for OpenAI weights in a file). Dropout and other training-only settings are not
    compared."""
    import open_clip

    arch, _, weights = name.partition("@")
    source = f"open_clip:{name}"
    if not weights:
        raise ValueError(
            f"init_from={source!r} names no weights: add a pretrained tag or a local file, e.g. "
            f"open_clip:{arch}@openai (tags for {arch}: {open_clip.list_pretrained_tags_by_model(arch) or 'none'})"
        )
    tag = open_clip.get_pretrained_cfg(arch, weights)
    if not tag:
        file = Path(weights).expanduser()
        if not file.is_file():
            raise FileNotFoundError(
                f"init_from={source!r}: {weights!r} is neither a pretrained tag of {arch} "
                f"({', '.join(open_clip.list_pretrained_tags_by_model(arch)) or 'none known'}) nor a weights file"
            )
        weights = str(file)
    failure = None
    try:
        theirs = open_clip.create_model(
            arch, pretrained=weights, force_quick_gelu=bool(tag.get("quick_gelu")), require_pretrained=True
        )
    except RuntimeError as e:  # open_clip's error for unknown names, unreadable files and failed downloads alike
        if "Failed to download" not in str(e):
            raise ValueError(f"init_from={source!r}: {e}") from None
        failure = type(e.__cause__ or e).__name__
    if failure is not None:
        # Raised outside the except block, so the hub's own message is not even the context: the CLI, which reports
        # the innermost error of a chain, shows this one.
        raise ConnectionError(
            f"cannot fetch open_clip weights {name!r} from the hub ({failure}); it needs the network once (then it is "
            f"cached), or give a local file: init_from='open_clip:{arch}@<weights file>'"
        )
    config, state = convert_open_clip(theirs.state_dict())
    check_fits(model_config(model), {**config, **open_clip_config(theirs)}, source)
    return state


def load_hf_clip(name: str, model: CLIP) -> dict[str, Tensor]:
    """`init_from="hf:<name>"`: a transformers `CLIPModel` (a hub name such as openai/clip-vit-base-patch32, fetched
    once and cached, or a local `save_pretrained` folder) as `model`'s complete state dict, after checking that
    `model` has its architecture (every differing key named at once). Dropout is not compared."""
    from transformers import CLIPModel

    source = f"hf:{name}"
    folder = Path(name).expanduser()
    if folder.is_dir():
        theirs = CLIPModel.from_pretrained(str(folder))
    elif name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"CLIPModel folder not found: {folder}")
    else:
        theirs, failure = None, ""
        try:
            theirs = CLIPModel.from_pretrained(name)
        except OSError as e:  # offline, no network, unknown repository
            failure = type(e).__name__
        if theirs is None:
            # Raised outside the except block (see load_open_clip).
            raise ConnectionError(
                f"cannot fetch CLIP weights {name!r} from the Hugging Face hub ({failure}); it needs the network once "
                "(then it is cached), or give a local save_pretrained folder: init_from='hf:<folder>'"
            )
    config, state = convert_hf_clip(theirs.state_dict())
    check_fits(model_config(model), {**config, **hf_clip_config(theirs.config)}, source)
    return state


_EXPORT_BLOCK = {mine: theirs for theirs, mine in _BLOCK.items()}  # our Block -> open_clip residual block


def _tower_activations(model: CLIP) -> tuple[bool, dict[str, dict[str, str] | None]]:
    """open_clip's global `quick_gelu` flag and each tower's `act_kwargs` for our activations (checked before)."""
    acts = {tower: getattr(model.cfg, tower).backbone.activation for tower in ("image", "text")}
    quick = all(a == "quick_gelu" for a in acts.values())
    return quick, {tower: {"approximate": "tanh"} if a == "gelu_tanh" else None for tower, a in acts.items()}


def open_clip_export_problems(model: CLIP) -> list[str]:
    """Every setting of `model` that an open_clip `CLIP` (ViT towers, built from a model config) cannot express, as
    "model.<key>=<needed> (here <value>)". Free: sizes, norm eps (norm_kwargs), pre-norm (no_ln_pre), context
    length, vocabulary, end-of-text id, dropout (training only); a missing bias is written as zeros, fixed text
    positions (sinusoidal, or none: zeros) as the learned table they equal within the context."""
    cfg = model.cfg
    wrong = []
    for tower in ("image", "text"):
        b = getattr(cfg, tower).backbone
        if b.kv_heads not in (None, b.heads):
            wrong.append(f"model.{tower}.backbone.kv_heads=None (here {b.kv_heads!r})")
        if b.activation not in ("gelu", "gelu_tanh", "quick_gelu"):
            wrong.append(f"model.{tower}.backbone.activation in ['gelu', 'gelu_tanh', 'quick_gelu'] "
                         f"(here {b.activation!r})")  # fmt: skip
        if b.norm != "layernorm":
            wrong.append(f"model.{tower}.backbone.norm='layernorm' (here {b.norm!r})")
        if not b.prenorm:
            wrong.append(f"model.{tower}.backbone.prenorm=True (here {b.prenorm!r})")
        if not b.final_norm:  # ln_post / ln_final are always there
            wrong.append(f"model.{tower}.backbone.final_norm=True (here {b.final_norm!r})")
        if b.window is not None:
            wrong.append(f"model.{tower}.backbone.window=None (here {b.window!r})")
        if b.qk_norm:  # open_clip's attention has no query/key norms
            wrong.append(f"model.{tower}.backbone.qk_norm=False (here {b.qk_norm!r})")
        if b.layer_scale is not None:  # open_clip's ls_1/ls_2 (ls_init_value) are not mapped yet
            wrong.append(f"model.{tower}.backbone.layer_scale=None (here {b.layer_scale!r})")
    image, text = cfg.image.backbone.activation, cfg.text.backbone.activation
    if (image == "quick_gelu") != (text == "quick_gelu"):  # open_clip's quick_gelu flag is for both towers
        wrong.append(f"model.image.backbone.activation and model.text.backbone.activation both 'quick_gelu' or both "
                     f"GELU (here {image!r}, {text!r})")  # fmt: skip
    if cfg.image.pool != "cls":  # open_clip's average pooling still runs a class token through the blocks
        wrong.append(f"model.image.pool='cls' (here {cfg.image.pool!r})")
    if cfg.image.channels != 3:
        wrong.append(f"model.image.channels=3 (here {cfg.image.channels!r})")  # open_clip's conv1 takes RGB
    if cfg.text.backbone.position == "rotary":
        wrong.append(f"model.text.backbone.position='learned' (here {cfg.text.backbone.position!r})")
    return wrong


def open_clip_state_dict(model: CLIP) -> dict[str, Tensor]:
    """`model`'s weights in open_clip `CLIP` keys: the inverse of `convert_open_clip`. The patch projection's bias
    (open_clip's has none) is added to the patch positions instead, the same sum; the logit scale is written capped
    at `max_logit_scale`, as ours uses it."""
    cfg = model.cfg
    ours = model.state_dict()
    for name, module in model.named_modules():
        if name.startswith(("image.encoder", "image.norm_pre", "text.encoder")) and getattr(module, "bias", 0) is None:
            # backbone.bias=False: open_clip's layers all have a bias; zero is ours
            rows = module.weight.shape[0] if isinstance(module, nn.Linear) else module.weight.shape
            ours[f"{name}.bias"] = module.weight.detach().new_zeros(rows)
    out: dict[str, Tensor] = {}
    for key, value in ours.items():
        if m := re.fullmatch(r"(image|text)\.encoder\.blocks\.(\d+)\.(.+)", key):
            prefix = "visual.transformer" if m[1] == "image" else "transformer"
            out[f"{prefix}.resblocks.{m[2]}.{_rename(m[3], _EXPORT_BLOCK)}"] = value
    pos = ours["image.pos_embed"][0].clone()  # (1 + N, D)
    if "image.patch.proj.bias" in ours:
        pos[1:] += ours["image.patch.proj.bias"]
    text = cfg.text.backbone
    if text.position == "learned":
        positions = ours["text.encoder.positions.weight"]
    elif text.position == "sinusoidal":
        positions = model.text.encoder.positions.table[: text.max_len].to(pos.dtype)
    else:  # no positions: a zero table adds nothing
        positions = pos.new_zeros(text.max_len, text.width)
    out.update({
        "visual.conv1.weight": ours["image.patch.proj.weight"],
        "visual.class_embedding": ours["image.patch.cls_token"].reshape(-1),
        "visual.positional_embedding": pos,
        "visual.ln_post.weight": ours["image.encoder.norm.weight"],
        "visual.ln_post.bias": ours["image.encoder.norm.bias"],
        "visual.proj": ours["image_proj.weight"].T,  # x @ (D, E) == Linear with weight (E, D)
        "token_embedding.weight": ours["text.embed.weight"],
        "positional_embedding": positions,
        "ln_final.weight": ours["text.encoder.norm.weight"],
        "ln_final.bias": ours["text.encoder.norm.bias"],
        "text_projection": ours["text_proj.weight"].T,
        "logit_scale": ours["logit_scale"].clamp(max=math.log(cfg.max_logit_scale)).reshape(()),
    })  # fmt: skip
    if "logit_bias" in ours:  # SigLIP: open_clip's CLIP holds it when built with init_logit_bias (the config's)
        out["logit_bias"] = ours["logit_bias"].reshape(())
    if cfg.image.norm_pre:
        out["visual.ln_pre.weight"], out["visual.ln_pre.bias"] = (
            ours["image.norm_pre.weight"],
            ours["image.norm_pre.bias"],
        )
    return out


def open_clip_model_config(model: CLIP) -> dict[str, Any]:
    """The open_clip model config (`embed_dim`, `vision_cfg`, `text_cfg`, `quick_gelu`) of `model`'s function. The
    text tower pools at the end-of-text token: 'argmax' where it is the highest id (OpenAI's tokenizer, what
    `open_clip_config` reads back), else 'eos'. Both take its first occurrence, ours its last: the same for token
    rows with one end-of-text, as CLIP tokenizers write them."""
    cfg = model.cfg
    quick, act_kwargs = _tower_activations(model)
    image, text = cfg.image.backbone, cfg.text.backbone
    vision_cfg: dict[str, Any] = {
        "image_size": cfg.image.image_size,
        "patch_size": cfg.image.patch_size,
        "layers": image.depth,
        "width": image.width,
        "head_width": image.head_dim,
        "mlp_ratio": image.mlp_ratio,
        "no_ln_pre": not cfg.image.norm_pre,
        "pool_type": "tok",
        "norm_kwargs": {"eps": image.norm_eps},
    }
    text_cfg: dict[str, Any] = {
        "context_length": text.max_len,
        "vocab_size": cfg.vocab_size,
        "width": text.width,
        "heads": text.heads,
        "layers": text.depth,
        "mlp_ratio": text.mlp_ratio,
        "pool_type": "argmax" if cfg.eos_id == cfg.vocab_size - 1 else "eos",
        "eos_id": cfg.eos_id,
        "norm_kwargs": {"eps": text.norm_eps},
    }
    for tower_cfg, kwargs in ((vision_cfg, act_kwargs["image"]), (text_cfg, act_kwargs["text"])):
        if kwargs is not None:
            tower_cfg["act_kwargs"] = kwargs
    config = {"embed_dim": cfg.embed_dim, "quick_gelu": quick, "vision_cfg": vision_cfg, "text_cfg": text_cfg}
    if cfg.loss == "siglip":  # makes open_clip's CLIP create `logit_bias` (the exported value replaces the start)
        config["init_logit_bias"] = cfg.init_logit_bias
    return config


# The model name an export registers under by default (the stem of its config file). Fixed, not the folder's name:
# exports are often written into a temporary folder and renamed.
OPEN_CLIP_EXPORT_NAME = "polyformer-clip"


def export_open_clip(model: CLIP, out_dir: Path, name: str = OPEN_CLIP_EXPORT_NAME, overwrite: bool = False) -> Path:
    """Write `model` as an open_clip CLIP: `open_clip_model.safetensors`, the model config as `<name>.json` for
    `open_clip.add_model_config(out_dir / f"{name}.json")` and then
    `open_clip.create_model(name, pretrained=str(out_dir / "open_clip_model.safetensors"))` (another `name` tells
    several exports apart in one process), and as `open_clip_config.json` (the hub layout) for
    `open_clip.create_model(f"local-dir:{out_dir}")`. Both give `model`'s image and text embeddings. Refuses (one
    ValueError naming every setting) what open_clip cannot express, before writing anything."""
    from polyformer.weights.export import prepare_out_dir, refuse, write_json, write_safetensors

    wrong = open_clip_export_problems(model)
    if name == "open_clip_config" or not name or "/" in name:
        wrong.append(f"a file name other than 'open_clip_config' for the config (here name={name!r})")
    refuse("CLIP", "an open_clip CLIP", wrong)
    out = prepare_out_dir(out_dir, overwrite)
    config = open_clip_model_config(model)
    write_safetensors(out / "open_clip_model.safetensors", open_clip_state_dict(model))
    write_json(out / f"{name}.json", config)
    write_json(
        out / "open_clip_config.json", {"model_cfg": config, "preprocess_cfg": {"size": model.cfg.image.image_size}}
    )
    return out
