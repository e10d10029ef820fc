"""timm `VisionTransformer` weights (Wightman, pytorch-image-models; the ViT of Dosovitskiy et al. 2020, DeiT of
Touvron et al. 2021 and AugReg of Steiner et al. 2021) into `polyformer.models.vit.ViT`.

`convert_timm_vit` maps one state dict to ours and says what architecture it needs; `timm_vit_config` reads the
whole architecture off a timm model (heads, activation and norm eps are not in a state dict); `load_timm_vit` is
`init_from="timm:<name>[@<weights file>]"`: the named timm model with its pretrained weights (Hugging Face hub, or
timm's local cache offline), or with a local file's.
Covered: every plain ViT size, class-token or average pooling (fc_norm), pre-norm (CLIP-style), GELU/QuickGELU,
LayerScale (`init_values`: timm's `ls1.gamma` / `ls2.gamma` are our blocks' own names; DeiT III, CaiT).
Refused with a message: register tokens, q/k norms, attention-pool heads, positions without the class
token (these architectures need blocks our backbone does not have).

The way out: `export_timm_vit` writes a `ViT` as timm weights plus the `timm.create_model` arguments that build it
(LayerNorm or RMSNorm at timm's eps 1e-6, pre-LN blocks, any pooling, bias and activation ours has but SwiGLU,
LayerScale as `init_values`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from polyformer.models.image_tower import resize_pos_embed
from polyformer.weights import check_fits, zero_bias

if TYPE_CHECKING:
    from polyformer.models.vit import ViT

# timm name -> ours; block keys keep their names (norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2).
_RENAMES = {
    "cls_token": "tower.patch.cls_token",
    "pos_embed": "tower.pos_embed",
    "patch_embed.proj.weight": "tower.patch.proj.weight",
    "patch_embed.proj.bias": "tower.patch.proj.bias",
    "norm_pre.weight": "tower.norm_pre.weight",
    "norm_pre.bias": "tower.norm_pre.bias",
    "norm.weight": "tower.encoder.norm.weight",
    "norm.bias": "tower.encoder.norm.bias",
    "fc_norm.weight": "tower.norm_post.weight",  # average pooling: the final norm after pooling
    "fc_norm.bias": "tower.norm_post.bias",
    "head.weight": "head.weight",
    "head.bias": "head.bias",
}
_BLOCK = re.compile(r"blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)")
_LAYER_SCALE = re.compile(r"blocks\.(\d+)\.(ls1|ls2)\.gamma")  # timm's LayerScale: the same names as ours
# The `backbone.layer_scale` a model built to receive timm's gammas is given: only its presence matters, the weights'
# gammas replace the start value (1e-5: timm's and CaiT's usual init_values).
_LOADED_LAYER_SCALE = 1e-5


def convert_timm_vit(
    state_dict: dict[str, Tensor], grid: int | None = None
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """timm VisionTransformer state dict -> (the `--model.` keys it needs, a `ViT` state dict). `grid`: resize the
    positions to grid x grid patches (another image size than the weights were trained at)."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key in _RENAMES:
            out[_RENAMES[key]] = value
        elif m := _BLOCK.fullmatch(key):
            out[f"tower.encoder.blocks.{m[1]}.{m[2]}.{m[3]}"] = value
        elif _LAYER_SCALE.fullmatch(key):
            out[f"tower.encoder.{key}"] = value
        else:
            raise ValueError(
                f"timm ViT weight {key!r} has no counterpart in polyformer's ViT (register tokens, "
                f"q/k norm and attention pooling are not supported); choose a plain ViT"
            )
    # Pre-norm (CLIP-style) timm ViTs have a patch projection without bias; ours always has one: zero is exact.
    zero_bias(out, "tower.patch.proj.weight")
    class_token = "tower.patch.cls_token" in out
    if not class_token and "tower.norm_post.weight" not in out:
        # timm's average pooling without fc_norm normalises every token before pooling; ours normalises the pooled
        # token (timm's fc_norm), another function.
        raise ValueError("timm ViT average pooling without fc_norm is not supported; choose one with fc_norm")
    proj = out["tower.patch.proj.weight"]  # (D, C, p, p)
    width, patch = proj.shape[0], proj.shape[-1]
    config: dict[str, Any] = {
        "backbone.width": width,
        "backbone.depth": len({k.split(".")[3] for k in out if k.startswith("tower.encoder.blocks.")}),
        "backbone.bias": "tower.encoder.blocks.0.attn.qkv.bias" in out,
        "patch_size": patch,
        "channels": proj.shape[1],
        "pool": "cls" if class_token else "avg",
        "norm_pre": "tower.norm_pre.weight" in out,
    }
    if "tower.encoder.blocks.0.mlp.fc1.weight" in out:
        config["backbone.mlp_ratio"] = out["tower.encoder.blocks.0.mlp.fc1.weight"].shape[0] / width
    if "head.weight" in out:
        config["num_classes"] = out["head.weight"].shape[0]
    if "tower.encoder.blocks.0.ls1.gamma" in out:  # the value is free (the gammas replace it); only "not None" is not
        config["backbone.layer_scale"] = _LOADED_LAYER_SCALE
    if "tower.pos_embed" in out:
        prefix = int(class_token)
        side = math.isqrt(out["tower.pos_embed"].shape[1] - prefix)
        if side * side != out["tower.pos_embed"].shape[1] - prefix:
            raise ValueError("timm ViT positions do not cover the class token (no_embed_class); not supported")
        if grid is not None:
            out["tower.pos_embed"] = resize_pos_embed(out["tower.pos_embed"], grid, prefix)
            side = grid
        config["position"] = "learned"
        config["image_size"] = side * patch
    return config, out


def timm_vit_config(model: nn.Module) -> dict[str, Any]:
    """The `--model.` keys (dotted, as the CLI spells them) of the `ViT` that reproduces a timm VisionTransformer."""
    block = model.blocks[0]
    act = block.mlp.act
    if isinstance(act, nn.GELU):
        activation = "gelu_tanh" if act.approximate == "tanh" else "gelu"
    elif type(act).__name__ == "QuickGELU":
        activation = "quick_gelu"
    else:
        raise ValueError(f"timm ViT activation {type(act).__name__} is not supported (gelu, gelu_tanh, quick_gelu)")
    pool = {"token": "cls", "avg": "avg"}.get(model.global_pool)
    if pool is None or (pool == "avg") == (model.cls_token is not None):
        raise ValueError(
            f"timm ViT pooling {model.global_pool!r} with class_token={model.cls_token is not None} is not supported; "
            f"polyformer has class-token pooling, or average pooling without a class token"
        )
    if not isinstance(block.norm1, nn.LayerNorm):
        raise ValueError(f"timm ViT norm {type(block.norm1).__name__} is not supported (LayerNorm)")
    width = model.embed_dim
    return {
        "backbone.width": width,
        "backbone.depth": len(model.blocks),
        "backbone.heads": block.attn.num_heads,
        "backbone.kv_heads": None,
        "backbone.mlp_ratio": block.mlp.fc1.out_features / width,
        "backbone.activation": activation,
        "backbone.norm": "layernorm",
        "backbone.norm_eps": block.norm1.eps,
        "backbone.prenorm": True,
        "backbone.final_norm": True,
        "backbone.bias": block.attn.qkv.bias is not None,
        "backbone.layer_scale": None if isinstance(block.ls1, nn.Identity) else _LOADED_LAYER_SCALE,
        "patch_size": model.patch_embed.patch_size[0],
        "image_size": model.patch_embed.img_size[0],
        "channels": model.patch_embed.proj.in_channels,
        "num_classes": model.num_classes,
        "pool": pool,
        "position": "learned",
        "norm_pre": not isinstance(model.norm_pre, nn.Identity),
    }


def model_config(model: ViT) -> dict[str, Any]:
    """A ViT's config as the dotted `--model.` keys `check_fits` compares."""
    cfg = model.cfg
    keys = {f"backbone.{k}": v for k, v in dataclasses.asdict(cfg.backbone).items()}
    keys.update({f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "backbone"})
    return keys


def load_timm_vit(name: str, model: ViT) -> dict[str, Tensor]:
    """`init_from="timm:<name>"`: timm's pretrained `name` as `model`'s complete state dict. timm adapts the weights
    to the model's input channels and position grid; `<name>@<file>` reads the weights from a local file (a timm
    state dict, .pth or .safetensors) instead of the hub. A head for another class count than the weights' is the
    model's own initial head."""
    import timm

    arch, _, file = name.partition("@")
    source = f"timm:{name}"
    extra: dict[str, Any] = {}
    if file:
        if not Path(file).is_file():
            raise FileNotFoundError(f"init_from={source!r}: no weights file {file!r}")
        extra["pretrained_cfg_overlay"] = dict(file=file)
    cfg = model.cfg
    try:
        theirs = timm.create_model(
            arch, pretrained=True, num_classes=cfg.num_classes, in_chans=cfg.channels, img_size=cfg.image_size, **extra
        )
    except RuntimeError as e:  # timm raises RuntimeError for unknown names (and for weights of another shape)
        hint = "; see timm.list_models('vit_*')" if "Unknown model" in str(e) else ""
        raise ValueError(f"init_from={source!r}: {e}{hint}") from None
    except OSError as e:  # the hub unreachable and the weights not in the local cache
        raise ConnectionError(
            f"could not fetch timm weights {arch!r} ({e}); fetching them needs the network once (they are cached "
            f"then), or give a local file: init_from='timm:{arch}@<weights file>'"
        ) from None
    config, state = convert_timm_vit(theirs.state_dict(), grid=model.tower.patch.grid)
    needs = {**timm_vit_config(theirs), **config}
    if needs["backbone.layer_scale"] is not None and cfg.backbone.layer_scale is not None:
        del needs["backbone.layer_scale"]  # any start value takes the weights' gammas
    check_fits(model_config(model), needs, source)
    if theirs.pretrained_cfg.get("num_classes") != cfg.num_classes:
        # timm dropped the pretrained head (another class count) and made its own: keep ours, as a run from scratch.
        own = model.state_dict()
        state.update({k: own[k] for k in ("head.weight", "head.bias")})
    return state


# What `timm.create_model(..., norm_layer=<name>)` builds, with the only eps its JSON arguments can give: timm's
# default 1e-6 (a partial with another eps is not JSON).
_TIMM_NORMS = {"layernorm": "layernorm", "rmsnorm": "rmsnorm"}
_TIMM_NORM_EPS = 1e-6
_TIMM_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_tanh", "quick_gelu": "quick_gelu", "relu": "relu"}
# A registered VisionTransformer entry point; every argument it sets (patch size, width, depth, heads) is overridden
# by the exported model's own, so it only names the class that timm builds.
_TIMM_ARCHITECTURE = "vit_base_patch16_224"


def timm_export_problems(model: ViT) -> list[str]:
    """Every setting of `model` that timm's VisionTransformer built from JSON arguments cannot express, as
    "model.<key>=<needed> (here <value>)". Free: sizes, pooling, pre-norm, final norm, bias (timm's qkv_bias and
    proj_bias; norms get zero biases), dropout rates; the backbone's own positions are unused by the image tower."""
    b = model.cfg.backbone
    wrong = []
    if b.kv_heads not in (None, b.heads):
        wrong.append(f"model.backbone.kv_heads=None (here {b.kv_heads!r})")
    if b.activation not in _TIMM_ACTIVATIONS:
        wrong.append(f"model.backbone.activation in {sorted(_TIMM_ACTIVATIONS)} (here {b.activation!r})")
    if b.norm not in _TIMM_NORMS:
        wrong.append(f"model.backbone.norm in {sorted(_TIMM_NORMS)} (here {b.norm!r})")
    if b.norm == "rmsnorm" and model.cfg.norm_pre:
        # Our pre-norm is a LayerNorm whatever the blocks use; timm's is the blocks' norm.
        wrong.append("model.norm_pre=False or model.backbone.norm='layernorm' (here norm_pre=True with rmsnorm)")
    if b.norm_eps != _TIMM_NORM_EPS:
        wrong.append(f"model.backbone.norm_eps={_TIMM_NORM_EPS} (here {b.norm_eps!r})")
    if not b.prenorm:
        wrong.append(f"model.backbone.prenorm=True (here {b.prenorm!r})")  # post-LN blocks take a class, not JSON
    if b.window is not None:
        wrong.append(f"model.backbone.window=None (here {b.window!r})")
    if b.qk_norm:  # timm norms q and k with the blocks' norm layer (a LayerNorm with a bias in our layout): not mapped
        wrong.append(f"model.backbone.qk_norm=False (here {b.qk_norm!r})")
    return wrong


def timm_state_dict(model: ViT) -> dict[str, Tensor]:
    """`model`'s weights in timm VisionTransformer keys: the inverse of `convert_timm_vit`. A pre-norm timm ViT has
    a bias-free patch projection: ours is added to the patch positions instead (the same sum). Norms without a bias
    get zeros; fixed sin-cos positions become the learned table they equal at the model's image size."""
    cfg = model.cfg
    ours = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm) and module.bias is None:  # backbone.bias=False: timm's norms have one
            ours[f"{name}.bias"] = module.weight.detach().new_zeros(module.weight.shape)
    inverse = {mine: theirs for theirs, mine in _RENAMES.items()}
    out: dict[str, Tensor] = {}
    for key, value in ours.items():
        if m := re.fullmatch(r"tower\.encoder\.blocks\.(\d+)\.(.+)", key):
            out[f"blocks.{m[1]}.{m[2]}"] = value
        elif key in inverse:
            out[inverse[key]] = value
        else:
            raise ValueError(f"ViT weight {key!r} has no counterpart in timm's VisionTransformer")
    pos = model.tower.pos_embed.detach().float().clone()  # a buffer for sin-cos positions: not in the state dict
    if cfg.norm_pre:
        pos[:, model.tower.prefix :] += out.pop("patch_embed.proj.bias").float()
    out["pos_embed"] = pos.to(model.tower.patch.proj.weight.dtype)
    return out


def timm_model_args(model: ViT) -> dict[str, Any]:
    """The keyword arguments of timm's `VisionTransformer` (through `timm.create_model`) for `model`'s function."""
    cfg, b = model.cfg, model.cfg.backbone
    return {
        "img_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "in_chans": cfg.channels,
        "num_classes": cfg.num_classes,
        "global_pool": "token" if cfg.pool == "cls" else "avg",
        "class_token": cfg.pool == "cls",
        "embed_dim": b.width,
        "depth": b.depth,
        "num_heads": b.heads,
        "mlp_ratio": b.mlp_ratio,
        "qkv_bias": b.bias,
        "proj_bias": b.bias,
        "pre_norm": cfg.norm_pre,
        "final_norm": b.final_norm,
        "act_layer": _TIMM_ACTIVATIONS[b.activation],
        "norm_layer": _TIMM_NORMS[b.norm],
        # Training only (equal logits in eval); timm's MLP also drops its hidden layer at proj_drop_rate.
        "pos_drop_rate": b.dropout,
        "proj_drop_rate": b.dropout,
        "attn_drop_rate": b.attention_dropout,
        "drop_path_rate": b.drop_path,
        "init_values": b.layer_scale,  # LayerScale's start; the exported gammas replace it
    }


def timm_pretrained_cfg(model: ViT) -> dict[str, Any]:
    """The pretrained config timm keeps beside the weights: the class count (timm drops a head whose count differs
    from it), the input size and the layers it adapts. Normalisation is not the model's to know: timm's defaults."""
    cfg = model.cfg
    return {
        "architecture": _TIMM_ARCHITECTURE,
        "num_classes": cfg.num_classes,
        "input_size": [cfg.channels, cfg.image_size, cfg.image_size],
        "fixed_input_size": True,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }


def export_timm_vit(model: ViT, out_dir: Path, overwrite: bool = False) -> Path:
    """Write `model` as timm VisionTransformer weights, `model.safetensors`, and the arguments that build it:
    `timm_kwargs.json` ({"model_name", "kwargs"}) for
    `timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=dict(file=<model.safetensors>), **kwargs)`,
    and timm's own `config.json`, so `timm.create_model("local-dir:<out_dir>", pretrained=True)` loads it too. Both
    give `model`'s logits. Refuses (one ValueError naming every setting) what timm cannot express, before writing."""
    from polyformer.weights.export import prepare_out_dir, refuse, write_json, write_safetensors

    refuse("ViT", "a timm VisionTransformer", timm_export_problems(model))
    out = prepare_out_dir(out_dir, overwrite)
    args, pretrained = timm_model_args(model), timm_pretrained_cfg(model)
    write_safetensors(out / "model.safetensors", timm_state_dict(model))
    write_json(
        out / "timm_kwargs.json", {"model_name": _TIMM_ARCHITECTURE, "kwargs": {**args, "pretrained_cfg": pretrained}}
    )
    write_json(
        out / "config.json",
        {"architecture": _TIMM_ARCHITECTURE, "num_classes": model.cfg.num_classes,
         "num_features": model.cfg.backbone.width, "pretrained_cfg": pretrained, "model_args": args},
    )  # fmt: skip
    return out
