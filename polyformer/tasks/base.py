"""What every task shares: the model it holds and when that is built (sizes from the data module's `DataInfo`),
the optimizer and its schedule, compile / activation checkpointing applied to the model from outside, the `media`
contract, and the checkpoint hooks (what they write and check is `polyformer.checkpointing.metadata`).

Optimizer recipe: AdamW (Loshchilov & Hutter 2019) with the paper's betas (0.9, 0.98) and eps 1e-9 as defaults,
weight decay on matrices only, linear warmup then cosine decay to a floor, the paper's inverse-sqrt schedule, or
warmup-stable-decay (Hägele et al. 2024). `name="muon"` trains the backbones' hidden matrices with Muon
(`polyformer.optim.muon`) and everything else with AdamW, in one optimizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, get_args

import lightning as L
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import ShardingStrategy
from torch.utils.checkpoint import checkpoint

from polyformer.backbone import Block, TokenEmbedding, Transformer
from polyformer.checkpointing.metadata import check_compatible, write_metadata
from polyformer.data.info import DataInfo, ProvidesDataInfo
from polyformer.optim import Muon, split_muon_groups
from polyformer.tasks.media import Media, MediaRequest

OptimizerName = Literal["adamw", "muon"]
Schedule = Literal["cosine", "inverse_sqrt", "constant", "wsd"]
DecayShape = Literal["linear", "1-sqrt"]


@dataclass
class OptimizerConfig:
    name: OptimizerName = "adamw"  # muon: Muon for the backbones' hidden matrices, AdamW (below) for the rest
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.98)  # the paper's; GPT-2 reproductions use (0.9, 0.95)
    eps: float = 1e-9
    weight_decay: float = 0.1  # applied to matrices only (not biases, norms, positions, class tokens)
    schedule: Schedule = "cosine"
    warmup_steps: int = 100
    max_steps: int | None = None  # length of the schedule; None = the Trainer's estimated optimizer steps
    min_lr_ratio: float = 0.1  # cosine / wsd floor as a fraction of lr
    decay_fraction: float = 0.2  # wsd: the lr decays over this last fraction of max_steps
    decay_shape: DecayShape = "linear"  # wsd: linear, or 1-sqrt (Hägele et al. 2024: a little lower loss)
    # Muon's updates have AdamW's RMS (0.2, polyformer.optim.muon), so None = lr is the right start.
    muon_lr: float | None = None
    muon_momentum: float = 0.95  # Nesterov momentum of the Muon matrices

    def __post_init__(self) -> None:
        for key, kind in (("name", OptimizerName), ("schedule", Schedule), ("decay_shape", DecayShape)):
            if (value := getattr(self, key)) not in get_args(kind):
                raise ValueError(f"optimizer.{key} must be one of {get_args(kind)}, got {value!r}")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ValueError(f"optimizer.decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if self.muon_lr is not None and not (math.isfinite(self.muon_lr) and self.muon_lr > 0):
            raise ValueError(f"optimizer.muon_lr must be a finite number > 0 or None (= lr), got {self.muon_lr}")
        if not 0.0 <= self.muon_momentum < 1.0:
            raise ValueError(f"optimizer.muon_momentum must be in [0, 1), got {self.muon_momentum}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"optimizer.lr must be a finite number > 0, got {self.lr}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optimizer.betas must each be in [0, 1), got {self.betas}")
        if self.weight_decay < 0 or self.warmup_steps < 0 or self.eps <= 0:
            raise ValueError(
                f"optimizer.weight_decay and warmup_steps must be >= 0 and eps > 0, got "
                f"{self.weight_decay}, {self.warmup_steps}, {self.eps}"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optimizer.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


def lr_multiplier(step: int, cfg: OptimizerConfig, total_steps: int) -> float:
    """Factor on the peak lr at optimizer step `step` (0-based)."""
    warmup = cfg.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "inverse_sqrt":  # the paper: d^-0.5 min(s^-0.5, s warmup^-1.5), normalised to 1 at warmup
        return math.sqrt(max(warmup, 1) / (step + 1))
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "wsd":  # constant at the peak, then decay over the last decay_fraction of the steps
        decay = max(1, round(cfg.decay_fraction * total_steps))
        progress = min(1.0, max(0.0, (step - (total_steps - decay)) / decay))
        shape = progress if cfg.decay_shape == "linear" else math.sqrt(progress)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * (1 - shape)
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# Modules whose `weight` is a matrix that decoupled weight decay regularises: linear maps, convolutions and token
# embeddings. Every other parameter (biases, norms, positions, class tokens, temperatures) is not decayed. Decided by
# the module a parameter belongs to, never by its shape or name: under FSDP (`use_orig_params=True`) parameters are
# flattened 1-D shards and names gain wrapper prefixes by the time `configure_optimizers` runs.
DECAYED_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, TokenEmbedding)

# Path parts that wrappers (FSDP, activation checkpointing, torch.compile) insert into parameter names.
_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """A parameter's name as the unwrapped model spells it."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def weight_decay_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups, matrices decayed and the rest not, each with its parameters' names (`param_names`, kept in
    the optimizer's state dict). A parameter shared by two modules (a tied head) is listed once."""
    groups: dict[bool, list[tuple[str, nn.Parameter]]] = {True: [], False: []}
    seen: set[int] = set()
    for module_name, m in module.named_modules():
        for name, p in m.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            decayed = isinstance(m, DECAYED_MODULES) and name == "weight"
            groups[decayed].append((clean_name(f"{module_name}.{name}" if module_name else name), p))
    return [
        {"params": [p for _, p in groups[True]], "param_names": [n for n, _ in groups[True]],
         "weight_decay": weight_decay},
        {"params": [p for _, p in groups[False]], "param_names": [n for n, _ in groups[False]], "weight_decay": 0.0},
    ]  # fmt: skip


def hidden_matrices(module: nn.Module) -> dict[int, tuple[int, int]]:
    """The weights of the linear maps inside every backbone (`Transformer`), by id, with their (out, in) shape from
    the layer's declared sizes (an FSDP shard is a 1-D slice): what Muon trains. Embeddings, output heads, patch
    convolutions, norms and biases are not among them, by construction of the model, not by name."""
    return {
        id(m.weight): (m.out_features, m.in_features)
        for backbone in module.modules()
        if isinstance(backbone, Transformer)
        for m in backbone.modules()
        if isinstance(m, nn.Linear) and m.weight.requires_grad
    }


def _recompute(block: nn.Module, *args: Any, cache: Any = None, **kwargs: Any) -> Any:
    """Run a block under non-reentrant activation checkpointing only where a backward will come: in training with
    grad enabled. Never with a KV cache, a dict the block mutates: its recompute would append the keys twice."""
    if block.training and torch.is_grad_enabled() and cache is None:
        return checkpoint(block, *args, use_reentrant=False, **kwargs)
    return block(*args, cache=cache, **kwargs)


class TaskModule(L.LightningModule):
    """Base of every task: a LightningModule that holds a plain-PyTorch model (`polyformer.models`) as `self.model`
    and owns the loss, metrics, decoding calls, logging and what goes into checkpoints.

    The model is built as soon as every size it needs is known: in `__init__` when the config gives them, else in
    `configure_model()` after `setup()` took them from the data module's `info()` (`connect_data`). Subclasses call
    `super().__init__(...)`, `self.save_hyperparameters()`, set their fields, and end `__init__` with `self.build()`.
    """

    # Hyperparameters (flattened, prefix match) that must agree between a checkpoint and the model loading it;
    # regularisation may change between pre-training and fine-tuning.
    architecture_hparams: tuple[str, ...] = ("backbone",)
    not_architecture: tuple[str, ...] = ("dropout", "attention_dropout")
    # Constructor arguments the model is built with that may come from the data (`connect_data`): until each is set,
    # the model waits (`missing_sizes`, `build`).
    size_arguments: tuple[str, ...] = ()

    def __init__(
        self,
        optimizer: OptimizerConfig | None = None,
        compile: bool = False,
        activation_checkpointing: bool = False,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        self.optim_cfg = optimizer or OptimizerConfig()
        self.compile_backbone = compile
        self.activation_checkpointing = activation_checkpointing
        # Where the first weights come from: a .ckpt of ours, hf:<name|folder>, timm:<name>, open_clip:<name>
        # (`polyformer.weights.load_weights`); None = this task's initialisation.
        self.init_from = init_from
        self.model: nn.Module | None = None

    # ---- building ---------------------------------------------------------------------------------------------
    def missing_sizes(self) -> list[str]:
        """Constructor arguments the model needs that are still unset (the data module may provide them): those of
        `size_arguments` that are None."""
        return [name for name in self.size_arguments if getattr(self, name) is None]

    def build_model(self) -> nn.Module:
        """The task's model, from its now complete config."""
        raise NotImplementedError

    def connect_data(self, info: DataInfo) -> None:
        """Take sizes, tokenizers and what inference needs from the data module feeding this task."""

    def link(self, name: str, value: Any) -> None:
        """Set an unset constructor argument from the data. It then counts as a hyperparameter like the others:
        checkpoints store it and `load_task` rebuilds the model with it."""
        if getattr(self, name) is None and value is not None:
            setattr(self, name, value)
            # Saved again as a whole (Lightning's public way), so the hyperparameters logged to W&B at fit start show
            # the linked value too, not the None the constructor got.
            self.save_hyperparameters({**self.hparams, name: value})

    def build(self) -> bool:
        """Build the model (and load `init_from`) once every size is known; True when the model exists."""
        if self.model is None and not self.missing_sizes():
            self.model = self.build_model()
            if self.init_from:
                from polyformer.weights import load_weights

                load_weights(self.model, self.init_from)
        return self.model is not None

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        if isinstance(dm, ProvidesDataInfo):
            self.connect_data(dm.info())

    def configure_model(self) -> None:
        # Runs after setup and inside the strategy's context, so FSDP can shard and compile wraps the real modules.
        if not self.build():
            dm = self.trainer.datamodule if self._trainer is not None else None
            where = f"the data module {type(dm).__name__} does not provide them" if dm is not None else "no data"
            raise ValueError(
                f"{type(self).__name__} needs {', '.join(self.missing_sizes())} and {where}; set "
                + ", ".join(f"--model.{name}" for name in self.missing_sizes())
            )
        assert self.model is not None
        if self.activation_checkpointing and not any(isinstance(m, CheckpointWrapper) for m in self.model.modules()):
            # Each block is wrapped from outside, the backbone has no flag; state_dict keys stay the same (the
            # wrapper's hooks drop its prefix), so checkpoints load with or without it.
            wrap = partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT, checkpoint_fn=_recompute)
            is_block = lambda m: isinstance(m, Block)  # noqa: E731
            apply_activation_checkpointing(self.model, checkpoint_wrapper_fn=wrap, check_fn=is_block)
        for m in self.model.modules():
            if isinstance(m, Transformer) and self.compile_backbone:
                m.compile()  # in place: state_dict keys stay the same, and DDP/FSDP wrap the compiled module

    # ---- media ------------------------------------------------------------------------------------------------
    def media(self, batch: Any, request: MediaRequest) -> list[Media]:
        """What to show on a dashboard after validation, from the first rows of this rank's first validation batch
        (on the CPU). Called on global rank 0 only: it must not call a collective."""
        return []

    # ---- optimisation -----------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        cfg = self.optim_cfg
        groups = weight_decay_groups(self, cfg.weight_decay)
        if cfg.name == "muon":
            groups = split_muon_groups(groups, hidden_matrices(self), lr=cfg.muon_lr or cfg.lr)
            opt: torch.optim.Optimizer = Muon(
                groups, lr=cfg.lr, momentum=cfg.muon_momentum, betas=tuple(cfg.betas), eps=cfg.eps,
                process_group=self._sharding_group(),
            )  # fmt: skip
        else:
            fused = self.device.type == "cuda"
            opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)
        total = cfg.max_steps or int(self.trainer.estimated_stepping_batches)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, cfg, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _sharding_group(self) -> Any:
        """The process group whose ranks each hold a slice of every parameter (FSDP sharding it), else None."""
        model = self.trainer.strategy.model if self._trainer is not None else None
        if isinstance(model, FSDP) and model.sharding_strategy != ShardingStrategy.NO_SHARD:
            return model.process_group
        return None

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:  # fmt: skip
        # Lightning's FSDP precision plugin refuses norm clipping ("not supported for FSDPPrecision"), so every preset
        # with gradient_clip_val failed under FSDP. FSDP's own clip_grad_norm_ reduces the shards' norms across ranks:
        # the same global norm, and the same clipping, as one process.
        model = self.trainer.strategy.model if self._trainer is not None else None
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and isinstance(model, FSDP):
            model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def training_flops(self, batch: Any) -> float | None:
        """Model FLOPs of one training step on this batch (forward + backward, this device), for the throughput and
        MFU logs. Tasks compute it from their backbones' `training_flops`; None when a task cannot say."""
        return None

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        write_metadata(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_compatible(self, checkpoint)
        self.init_from = None  # the checkpoint's weights replace the initial ones: don't fetch those again
