"""Autoregressive decoding shared by every task: sampling (temperature, top-k, top-p; greedy at temperature 0)
and batched beam search with the GNMT length penalty (Wu et al. 2016), both on the backbone's KV cache.

A task gives a `forward(tokens, padding_mask, positions, cache) -> logits (N, T, V)` over the *new* tokens;
`Decoder` wraps it so the loops below always see the whole prefix and get next-token logits.
Legend: B batch, K beam size, N = B*K rows, t prefix length, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from polyformer.backbone import Cache, cache_length, reorder_cache

Forward = Callable[[Tensor, Tensor | None, Tensor, Cache | None], Tensor]


class Decoder:
    """Feeds only the tokens the cache has not seen (all of them when use_cache is False)."""

    def __init__(self, forward: Forward, new_cache: Callable[[], Cache], use_cache: bool = True) -> None:
        self.forward, self.new_cache, self.use_cache = forward, new_cache, use_cache
        self.cache: Cache | None = None

    def reset(self) -> None:
        self.cache = self.new_cache() if self.use_cache else None

    def reorder(self, index: Tensor) -> None:
        if self.cache is not None:
            self.cache = reorder_cache(self.cache, index)

    def __call__(self, tokens: Tensor, padding_mask: Tensor) -> Tensor:  # (N, t), (N, t) -> (N, V)
        start = cache_length(self.cache)
        positions = (padding_mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding: count real tokens only
        mask = None if bool(padding_mask.all()) else padding_mask  # no padding: SDPA's fast causal path
        logits = self.forward(tokens[:, start:], mask, positions[:, start:], self.cache)
        return logits[:, -1].float()


def check_sampling(
    max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None, prefix: str = ""
) -> None:
    """ValueError naming the first bad setting (`prefix` + field, value, accepted range). Written as `not (ok)` so
    that NaN fails too; top_p 0 would mask every token (NaN probabilities), top_k 0 would select none."""
    if not max_new_tokens >= 0:
        raise ValueError(f"{prefix}max_new_tokens must be >= 0, got {max_new_tokens}")
    if not temperature >= 0:
        raise ValueError(f"{prefix}temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and not top_k >= 1:
        raise ValueError(f"{prefix}top_k must be None (no top-k filter) or >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"{prefix}top_p must be None (no nucleus filter) or in (0, 1], got {top_p}")


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def sample(
    decoder: Decoder,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Continue each prompt; prompts of different lengths are left-padded. Returns the new tokens, without eos."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (start with the tokenizer's begin/end-of-text token)")
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    width = max(map(len, prompts))
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p) :] = torch.tensor(p, device=device)
        mask[i, width - len(p) :] = True
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    out: list[Tensor] = []
    decoder.reset()
    for _ in range(max_new_tokens):
        logits = decoder(tokens, mask)
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        real = ~done  # rows that already ended get padding, masked out of attention
        nxt = nxt.masked_fill(done, pad_id)
        out.append(nxt)
        if eos_id is not None:
            done = done | (nxt == eos_id)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        mask = torch.cat([mask, real[:, None]], dim=1)
        if bool(done.all()):
            break
    gen = torch.stack(out, 1).tolist() if out else [[] for _ in prompts]
    return [row[: row.index(eos_id)] if eos_id is not None and eos_id in row else row for row in gen]


@torch.no_grad()
def beam_search(
    decoder: Decoder,
    batch_size: int,
    bos_id: int,
    eos_id: int,
    beam_size: int,
    max_len: Tensor | int,
    length_penalty: float = 1.0,
    device: torch.device | str = "cpu",
) -> list[list[int]]:
    """Best hypothesis per source row. The decoder's forward must already see its memory repeated K times per row
    (row b*K + k). Scores are sum log p / ((5 + len) / 6) ** length_penalty; a row stops once it has K finished."""
    B, K = batch_size, beam_size
    max_len = torch.as_tensor(max_len, device=device).expand(B).tolist()
    tokens = torch.full((B * K, 1), bos_id, dtype=torch.long, device=device)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    done = [False] * B
    decoder.reset()
    for t in range(1, int(max(max_len)) + 1):
        logp = decoder(tokens, mask).log_softmax(-1)  # (N, V)
        V = logp.shape[-1]
        cand = (scores.view(-1, 1) + logp).view(B, K * V)
        top_scores, top_idx = cand.topk(2 * K, dim=-1)  # (B, 2K): at most K of them end in eos
        beam, tok = top_idx // V, top_idx % V
        is_eos = tok == eos_id
        norm = ((5 + t) / 6) ** length_penalty
        # One device-to-host copy per step, not one per element (each would wait for the GPU).
        eos_l, score_l, beam_l, tok_l = is_eos.tolist(), top_scores.tolist(), beam.tolist(), tok.tolist()
        for b in range(B):
            if done[b]:
                continue
            for j in range(K):  # only the top K may end: a worse eos must not fill the finished list (fairseq too)
                force = t >= max_len[b]  # out of length: the top K end here whatever they are
                if (eos_l[b][j] or force) and score_l[b][j] > float("-inf") and len(finished[b]) < K:
                    hyp = tokens[b * K + beam_l[b][j], 1:].tolist() + ([] if eos_l[b][j] else [tok_l[b][j]])
                    finished[b].append((score_l[b][j] / norm, hyp))
            done[b] = len(finished[b]) >= K or t >= max_len[b]
        if all(done):
            break
        alive = top_scores.masked_fill(is_eos, float("-inf")).topk(K, dim=-1)  # best K continuing hypotheses
        pick = alive.indices
        scores = alive.values
        rows = (torch.arange(B, device=device)[:, None] * K + beam.gather(1, pick)).view(-1)
        tokens = torch.cat([tokens[rows], tok.gather(1, pick).view(-1, 1)], dim=1)
        mask = torch.ones_like(tokens, dtype=torch.bool)
        decoder.reorder(rows)
    return [max(f, key=lambda s: s[0])[1] if f else [] for f in finished]
