"""The shared transformer stack (Vaswani et al. 2017). Encoder, decoder-only and encoder-decoder decoder are
configurations of this one class: `causal` masks the future, `cross_attention` attends to an encoder's memory.

Inputs are already embedded (tokens or patches); this class adds positions, runs the blocks and the final norm.
Legend: B batch, T positions, S memory positions, D width.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .attention import Attention, build_mask
from .config import TransformerConfig
from .layers import Block, make_norm
from .positional import LearnedPositions, RotaryPositions, SinusoidalPositions

Cache = list[dict[str, dict[str, Tensor]]]  # per block: {"self": {"k", "v"}, "cross": {"k", "v"}}


class Transformer(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.positions = {
            "sinusoidal": lambda: SinusoidalPositions(cfg.width, cfg.max_len),
            "learned": lambda: LearnedPositions(cfg.width, cfg.max_len),
            "rotary": lambda: None,
            "none": lambda: None,
        }[cfg.position]()
        self.rope = RotaryPositions(cfg.head_dim, cfg.rope_base) if cfg.position == "rotary" else None
        self.drop = nn.Dropout(cfg.dropout)
        # Stochastic depth grows linearly with depth, as in DeiT: deeper blocks are dropped more often.
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(cfg, drop_path=r) for r in rates)
        if cfg.layer_scale is not None:
            for block in self.blocks:
                add_layer_scale(block, cfg.width, cfg.layer_scale)
        self.norm = make_norm(cfg) if cfg.prenorm and cfg.final_norm else nn.Identity()
        init_weights(self, cfg.depth)

    def new_cache(self) -> Cache:
        return [{} for _ in self.blocks]

    def forward(
        self,
        x: Tensor,
        padding_mask: Tensor | None = None,
        positions: Tensor | None = None,
        memory: Tensor | None = None,
        memory_padding_mask: Tensor | None = None,
        cache: Cache | None = None,
    ) -> Tensor:
        """x: (B, T, D) embeddings. padding_mask: (B, S_total) True = real token; with a cache it covers the cached
        positions too. positions: (B|1, T), default counts on from the cache length. memory: (B, S, D)."""
        offset = cache_length(cache)
        T, cfg = x.shape[1], self.cfg
        if positions is None:
            positions = torch.arange(offset, offset + T, device=x.device)[None]
        if self.positions is not None:  # given positions never exceed their slot (left padding only lowers them)
            x = x + self.positions(positions, end=offset + T).to(x.dtype)
        rope = self.rope(positions) if self.rope is not None else None
        x = self.drop(x)

        # Plain causal self-attention takes SDPA's is_causal fast path (flash kernels); anything else gets a mask.
        simple = padding_mask is None and cfg.window is None
        is_causal = cfg.causal and simple and offset == 0 and T > 1
        needs_mask = not simple or (cfg.causal and offset > 0 and T > 1)
        mask = None
        if needs_mask:
            mask = build_mask(
                T, offset + T, causal=cfg.causal, window=cfg.window, padding_mask=padding_mask, device=x.device
            )
        memory_mask = None if memory_padding_mask is None else memory_padding_mask[:, None, None, :].bool()

        for i, block in enumerate(self.blocks):
            # The cache by keyword: a checkpoint wrapper applied from outside (the task's) sees it and skips the
            # recompute, which would append this step's keys to the mutated cache a second time.
            x = block(x, mask, is_causal, rope, memory, memory_mask, cache=None if cache is None else cache[i])
        return self.norm(x)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def training_flops(self, batch: int, length: int, memory: int = 0) -> float:
        """Model FLOPs of one training step (forward + backward = 3x forward) through the blocks, for `batch`
        sequences of `length` positions that cross-attend to `memory` encoder positions.

        A multiply-add is 2 FLOPs: each weight matrix costs 6 FLOPs per weight and position it is applied to, and
        attention 12 x width per (query, key) pair and block (Kaplan et al. 2020's 6N + 12LTD). Causal masks and
        padding are not discounted (PaLM's MFU convention). Norms and activations are left out, as in both papers.
        """
        # Cross-attention keys/values are computed on the memory positions; every other matrix on the queries.
        per_key = sum(weight_count(m.kv) for m in self.modules() if isinstance(m, Attention) and m.cross)
        per_query = sum(weight_count(m) for m in self.modules() if isinstance(m, nn.Linear)) - per_key
        queries, width, depth = batch * length, self.cfg.width, self.cfg.depth
        pairs = queries * (length + (memory if self.cfg.cross_attention else 0))
        return 6.0 * (per_query * queries + per_key * batch * memory) + 12.0 * depth * width * pairs


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch's output (Touvron et al. 2021, CaiT; DeiT III): the block computes
    x + gamma * f(x). `gamma` is a vector, so weight decay leaves it alone (matrices only)."""

    def __init__(self, width: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((width,), init))

    def forward(self, x: Tensor) -> Tensor:  # (B, T, D)
        return x * self.gamma

    def hook(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        return self(output)


def add_layer_scale(block: Block, width: int, init: float) -> None:
    """Scale each residual branch of `block` (attention, cross-attention, FFN) by its own LayerScale, named ls1,
    ls_cross and ls2 as timm names them. A forward hook on the branch, not a new Block class: Block stays the one
    class that FSDP wraps and activation checkpointing finds by type, and the branch's own keys do not move. The hook
    is a bound method, so a deep copy of the block (EMA, a compiled copy) scales with its own copy of gamma.
    Calling a branch (`block.attn(h)`) therefore returns its scaled output; `.forward` bypasses the hook."""
    for name, branch in (("ls1", block.attn), ("ls_cross", block.cross_attn), ("ls2", block.mlp)):
        if branch is not None:
            scale = LayerScale(width, init)
            block.add_module(name, scale)
            branch.register_forward_hook(scale.hook)


def weight_count(layer: nn.Linear | nn.Conv2d) -> int:
    """A matrix layer's weights from its declared shape: under FSDP `weight.numel()` is only this rank's shard."""
    if isinstance(layer, nn.Conv2d):
        return layer.in_channels // layer.groups * layer.out_channels * math.prod(layer.kernel_size)
    return layer.in_features * layer.out_features


def cache_length(cache: Cache | None) -> int:
    if not cache or "self" not in cache[0] or "k" not in cache[0]["self"]:
        return 0
    return cache[0]["self"]["k"].shape[2]


def reorder_cache(cache: Cache, index: Tensor) -> Cache:
    """Select batch rows (beam search: keep the surviving hypotheses) in every cached tensor."""
    return [{kind: {k: t.index_select(0, index) for k, t in kv.items()} for kind, kv in lay.items()} for lay in cache]


def init_weights(module: nn.Module, depth: int) -> None:
    """GPT-2 init: N(0, 0.02) weights, zero biases, unit norms; residual projections scaled by 1/sqrt(2 * depth)
    so the residual stream's variance does not grow with depth."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            std = 0.02 / math.sqrt(2 * depth) if getattr(m, "residual_projection", False) else 0.02
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
            nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, LearnedPositions):
            nn.init.normal_(m.weight, std=0.02)
