"""Attention maps, softmax(Q K^T / sqrt(d_k)) (Vaswani et al. 2017, section 3.2), computed outside the backbone.

The backbone's attention runs on SDPA, which never materialises the weights. Rather than a recording flag and a
second attention path in the model, forward hooks capture an `Attention` module's inputs and the weights are
recomputed here from the module's own projections, with the same masks, rotary positions and GQA sharing.
Legend: B batch, T query positions, S key positions, H heads, G key/value heads, Dh head dim.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn

from polyformer.backbone.attention import Attention, build_mask
from polyformer.backbone.positional import apply_rotary
from polyformer.tasks.base import clean_name


def queries_keys_values(
    attn: Attention, x: Tensor, context: Tensor | None = None, rope: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """q (B, H, T, Dh) and k, v (B, H, S, Dh) as `attn` computes them; shared K/V heads repeated to H."""
    H, G, Dh = attn.heads, attn.kv_heads, attn.head_dim
    heads = lambda t, n: t.unflatten(-1, (n, Dh)).transpose(1, 2)  # noqa: E731  (B, T, n*Dh) -> (B, n, T, Dh)
    if attn.cross:
        q = attn.q_norm(heads(attn.q(x), H))
        k, v = (heads(t, G) for t in attn.kv(context).split(G * Dh, dim=-1))
        k = attn.k_norm(k)
    else:
        q, k, v = attn.qkv(x).split([H * Dh, G * Dh, G * Dh], dim=-1)
        q, k, v = attn.q_norm(heads(q, H)), attn.k_norm(heads(k, G)), heads(v, G)  # QK-norm before rotary
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
    k, v = (t.repeat_interleave(H // G, dim=1) for t in (k, v))
    return q, k, v


@torch.no_grad()
def attention_weights(
    attn: Attention,
    x: Tensor,
    context: Tensor | None = None,
    mask: Tensor | None = None,
    is_causal: bool = False,
    rope: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """The softmax weights (B, H, T, S) that `attn(x, context, mask, is_causal, rope)` applies to its values, without
    dropout and without a KV cache; detached."""
    q, k, _ = queries_keys_values(attn, x, context, rope)
    scores = q @ k.transpose(-2, -1) / attn.head_dim**0.5  # (B, H, T, S)
    if is_causal:
        mask = build_mask(q.shape[2], k.shape[2], causal=True, window=None, padding_mask=None, device=q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1)


class AttentionRecorder:
    """Keeps the softmax weights of every `Attention` during one forward pass (the first call of each):
    - `maps`: example 0's, every head, cropped to the first `max_tokens` queries and keys (token x token grids);
    - `means`: the first `examples` examples' head average, uncropped (n, T, T), and `heads`: example 0's first
      `heads` heads, uncropped (h, T, T): what patch overlays and attention rollout need. Self-attention only, in
      float16, and only while n * T * T stays under `max_kept` (4 MB a module), so long text contexts keep just `maps`.
    A module whose full weights (B, H, T, S) would exceed `max_elements` is skipped rather than risking the memory of a
    large batch; cached decoding steps are skipped too. `remove()` takes the hooks off again."""

    def __init__(
        self,
        module: nn.Module,
        max_tokens: int,
        max_elements: int = 1 << 26,
        examples: int = 0,
        heads: int = 0,
        max_kept: int = 1 << 21,
    ) -> None:
        self.maps: dict[str, Tensor] = {}
        self.means: dict[str, Tensor] = {}
        self.heads: dict[str, Tensor] = {}
        self.max_tokens, self.max_elements = max_tokens, max_elements
        self.examples, self.num_heads, self.max_kept = examples, heads, max_kept
        self.handles = [
            m.register_forward_hook(self._make_hook(clean_name(name)), with_kwargs=True)
            for name, m in module.named_modules()
            if isinstance(m, Attention)
        ]

    def _make_hook(self, name: str) -> Any:
        def hook(m: Attention, args: tuple, kwargs: dict[str, Any], output: Tensor) -> None:
            call = inspect.signature(m.forward).bind(*args, **kwargs)  # the inputs however they were passed
            call.apply_defaults()
            a = call.arguments
            x, context = a["x"], a["context"]
            if name in self.maps or a["cache"] is not None or x.ndim != 3:
                return
            S = context.shape[1] if context is not None else x.shape[1]
            if x.shape[0] * m.heads * x.shape[1] * S > self.max_elements:
                return
            w = attention_weights(m, x, context, a["mask"], a["is_causal"], a["rope"])  # (B, H, T, S)
            self.maps[name] = w[0, :, : self.max_tokens, : self.max_tokens].float().cpu()
            n = min(self.examples, w.shape[0])
            if context is None and n and n * x.shape[1] * S <= self.max_kept:
                self.means[name] = w[:n].float().mean(dim=1).half().cpu()
                if self.num_heads:
                    self.heads[name] = w[0, : self.num_heads].half().cpu()

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
