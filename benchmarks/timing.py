"""Interleaved timing of contenders that do the same work, so a noisy machine slows them all alike.

Each round runs every contender once, in a rotated order (nobody always runs first or right after a cache-warming
neighbour); a contender's time is the median over rounds, and a ratio is the median of the per-round ratios, which
cancels slow phases of the machine that hit both members of a pair in the same round.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class Contender:
    """One model doing the case's work. `loss()` runs forward + loss on a fixed batch; `infer()` runs inference."""

    name: str
    model: nn.Module
    loss: Callable[[], Tensor]
    infer: Callable[[], Any]
    ours: bool = False
    note: str = ""
    optimizer: torch.optim.Optimizer | None = field(default=None, repr=False)


@dataclass
class Settings:
    device: torch.device
    precision: str  # "fp32" | "bf16" (bf16 autocast with fp32 weights, as Lightning's bf16-mixed)
    compile: bool = False
    warmup: int = 2
    rounds: int = 5

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def make_optimizer(model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    # The same optimizer for every contender: fused AdamW on CUDA (one kernel for all tensors), foreach on CPU.
    params = [p for p in model.parameters() if p.requires_grad]
    if device.type == "cuda":
        return torch.optim.AdamW(params, lr=1e-4, fused=True)
    return torch.optim.AdamW(params, lr=1e-4, foreach=True)


def train_step(c: Contender, s: Settings) -> None:
    assert c.optimizer is not None
    c.optimizer.zero_grad(set_to_none=True)
    with s.autocast():
        loss = c.loss()
    loss.backward()
    c.optimizer.step()


def infer_step(c: Contender, s: Settings) -> None:
    with torch.inference_mode(), s.autocast():
        c.infer()


def _timed(fn: Callable[[], None], s: Settings) -> float:
    s.sync()
    start = time.perf_counter()
    fn()
    s.sync()
    return time.perf_counter() - start


def interleave(
    contenders: list[Contender], step: Callable[[Contender, Settings], None], s: Settings
) -> dict[str, list[float]]:
    """Seconds per step of each contender, one sample per round."""
    for c in contenders:
        for _ in range(s.warmup):  # first steps allocate, pick kernels, compile
            step(c, s)
    times: dict[str, list[float]] = {c.name: [] for c in contenders}
    for r in range(s.rounds):
        k = r % len(contenders)
        for c in contenders[k:] + contenders[:k]:
            times[c.name].append(_timed(lambda c=c: step(c, s), s))
    return times


def paired_ratio(ours: list[float], peer: list[float]) -> float:
    """Our throughput over the peer's: the median over rounds of peer_time / our_time."""
    return statistics.median(p / o for o, p in zip(ours, peer))


@contextlib.contextmanager
def _saved_tensor_bytes(exclude: set[int]) -> Iterator[list[int]]:
    """Bytes of distinct storages autograd keeps for backward (the activations), parameters excluded."""
    seen: set[int] = set()
    total = [0]

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in seen and key not in exclude and not t.is_meta:
            seen.add(key)
            total[0] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total


def peak_memory(c: Contender, s: Settings) -> tuple[float, bool]:
    """Peak training memory in MiB and whether it is measured (CUDA) rather than estimated (CPU).

    CPU has no allocator statistics, so the estimate is what a training step must hold at its peak: parameters,
    gradients, AdamW's two moments, and the tensors autograd saves for backward."""
    if s.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(s.device)
        train_step(c, s)
        s.sync()
        return torch.cuda.max_memory_allocated(s.device) / 2**20, True
    params = [p for p in c.model.parameters() if p.requires_grad]
    exclude = {p.untyped_storage().data_ptr() for p in c.model.parameters()}
    assert c.optimizer is not None
    c.optimizer.zero_grad(set_to_none=True)
    with _saved_tensor_bytes(exclude) as saved, s.autocast():
        loss = c.loss()
    loss.backward()
    c.optimizer.zero_grad(set_to_none=True)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    return (4 * param_bytes + saved[0]) / 2**20, False
