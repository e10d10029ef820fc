"""Muon: momentum orthogonalised by a Newton-Schulz iteration, for the hidden weight matrices (Jordan et al. 2024,
"Muon: an optimizer for hidden layers in neural networks"; Liu et al. 2025, "Muon is Scalable for LLM Training").

For a matrix W with gradient G: B <- mu B + G; U = G + mu B (Nesterov); O = NS5(U) ~ the orthogonal factor of U's
polar decomposition (U = O P, every singular value mapped to ~1); W <- W (1 - lr wd) - lr 0.2 sqrt(max(m, n)) O.

Choices, and why:
- The quintic NS5 iteration X <- a X + b (X X^T) X + c (X X^T)^2 X with (a, b, c) = (3.4445, -4.7750, 2.0315), 5 steps,
  from X0 = U / ||U||_F: the published coefficients, which push small singular values up fast and leave all of them
  in ~[0.7, 1.2] rather than converging exactly (exactness buys nothing, the steps do).
- In float32, not bf16: on CPU bf16 matmuls are slow and on any device they round to 2^-8, which would make Muon the
  only part of a run that the parity matrix (polyformer.parity) cannot hold to float32 tolerances. At hidden sizes
  the iteration costs a few matmuls per matrix per step, small next to the forward and backward passes.
- Update scale 0.2 sqrt(max(m, n)) (Liu et al.): an orthogonal m x n matrix has entry RMS 1/sqrt(max(m, n)), so the
  update's RMS is 0.2, that of a typical AdamW update. The AdamW learning rate, weight decay and schedule then carry
  over to the Muon groups unchanged; the shape rule max(1, m/n)^0.5 would need its own, ~50x larger, lr.

Everything that is not a hidden matrix (embeddings, the output head, norms, biases, positions) takes AdamW steps in
the same optimizer (groups with use_muon=False), so one `torch.optim.Optimizer` serves Lightning's clipping, lr
schedulers and checkpoints. Under DDP gradients arrive averaged and each rank computes the same update locally.
Under FSDP (FlatParameter, use_orig_params) each rank holds a contiguous 1-D slice of each matrix, in rank order:
Newton-Schulz needs the whole matrix, so the Nesterov momenta are all-gathered over the sharding group, each rank
orthogonalises every matrix (the same arithmetic on every rank) and keeps its own slice.

Legend: m, n a matrix's rows and columns.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def newton_schulz(g: Tensor, steps: int = NS_STEPS, eps: float = 1e-7) -> Tensor:
    """An approximately orthogonal matrix with the singular vectors of `g` (m, n), in float32."""
    if g.ndim != 2:
        raise ValueError(f"Newton-Schulz orthogonalises matrices, got a tensor of shape {tuple(g.shape)}")
    a, b, c = NS_COEFFICIENTS
    x = g.float()
    tall = x.shape[0] > x.shape[1]
    if tall:  # iterate on the wide orientation: X X^T is then the smaller (min(m, n))^2 Gram matrix
        x = x.T
    x = x / (x.norm() + eps)  # singular values <= 1: inside the iteration's basin
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def update_scale(shape: tuple[int, int]) -> float:
    """0.2 sqrt(max(m, n)): the orthogonalised update's RMS becomes 0.2, AdamW's typical update RMS."""
    return 0.2 * math.sqrt(max(shape))


class Muon(torch.optim.Optimizer):
    """Muon for the groups with `use_muon=True` (each with `shapes`, the (m, n) of every parameter, which FSDP's 1-D
    shards no longer show), AdamW (decoupled weight decay) for the others. `process_group`: the FSDP sharding group
    whose ranks each hold a slice of every matrix; None when parameters are whole (one process, DDP)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 3e-4,
        momentum: float = 0.95,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-9,
        weight_decay: float = 0.0,
        process_group: Any = None,
    ) -> None:
        defaults = {"lr": lr, "momentum": momentum, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                    "use_muon": False}  # fmt: skip
        super().__init__(params, defaults)
        self.process_group = process_group
        for group in self.param_groups:
            if not group["use_muon"]:
                continue
            shapes = group.setdefault("shapes", [tuple(p.shape) for p in group["params"]])
            group["shapes"] = [tuple(s) for s in shapes]
            if len(shapes) != len(group["params"]) or any(len(s) != 2 for s in group["shapes"]):
                raise ValueError(f"Muon groups need one (rows, columns) shape per parameter, got {shapes}")
            if process_group is None and any(tuple(p.shape) != s for p, s in zip(group["params"], group["shapes"])):
                raise ValueError("Muon parameters are not whole matrices: pass the sharding process_group (FSDP)")

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (self._muon if group["use_muon"] else self._adamw)(group)
        return loss

    def _adamw(self, group: dict[str, Any]) -> None:
        """torch.optim.AdamW's arithmetic (bias-corrected moments, decoupled decay)."""
        (b1, b2), lr, eps, wd = group["betas"], group["lr"], group["eps"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            state["step"] += 1
            t, m, v = state["step"].item(), state["exp_avg"], state["exp_avg_sq"]
            m.lerp_(p.grad, 1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            p.mul_(1 - lr * wd)
            denom = (v.sqrt() / math.sqrt(1 - b2**t)).add_(eps)
            p.addcdiv_(m, denom, value=-lr / (1 - b1**t))

    def _muon(self, group: dict[str, Any]) -> None:
        mu, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
        params, shapes, nesterov = [], [], []
        for p, shape in zip(group["params"], group["shapes"]):
            grad = p.grad
            if grad is None:
                if self.process_group is None:
                    continue
                grad = torch.zeros_like(p)  # a rank without this matrix's gradient still joins the gather
            state = self.state[p]
            if not state:
                # AdamW's state keys, the momentum kept as exp_avg, exp_avg_sq unused: FSDP.optim_state_dict gathers
                # each key over all parameters of a FlatParameter, which mixes Muon matrices with AdamW biases and
                # norms, and fails on a key some of them lack. The price is AdamW's memory for the matrices.
                state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            state["step"] += 1
            buf = state["exp_avg"]
            buf.mul_(mu).add_(grad)
            params.append(p)
            shapes.append(shape)
            nesterov.append(grad.add(buf, alpha=mu))
        if self.process_group is not None:
            updates = self._orthogonalise_sharded(nesterov, shapes)
        else:
            updates = [newton_schulz(u) for u in nesterov]
        for p, shape, o in zip(params, shapes, updates):
            p.mul_(1 - lr * wd)
            p.add_(o.to(p.dtype).view_as(p), alpha=-lr * update_scale(shape))

    def _orthogonalise_sharded(self, local: list[Tensor], shapes: list[tuple[int, int]]) -> list[Tensor]:
        """Each matrix's slices gathered from every rank (in rank order they make the row-major matrix), Newton-
        Schulz on the whole, this rank's slice of the result. Two collectives per step: sizes, then one buffer."""
        group, world = self.process_group, dist.get_world_size(self.process_group)
        rank = dist.get_rank(group)
        device = local[0].device if local else torch.device("cpu")
        sizes = torch.tensor([u.numel() for u in local], dtype=torch.long, device=device)
        all_sizes = [torch.empty_like(sizes) for _ in range(world)]
        dist.all_gather(all_sizes, sizes, group=group)
        per_rank = torch.stack(all_sizes).tolist()  # [rank][matrix] elements
        for i, shape in enumerate(shapes):
            if sum(sizes[i] for sizes in per_rank) != math.prod(shape):
                raise RuntimeError(
                    f"Muon: the ranks' slices of a {shape} matrix hold {[sizes[i] for sizes in per_rank]} elements, "
                    f"not {math.prod(shape)}; only FSDP's flat sharding (each rank one contiguous slice) is supported"
                )
        flat = torch.cat([u.reshape(-1).float() for u in local]) if local else torch.zeros(0, device=device)
        padded = torch.zeros(max(map(sum, per_rank)), device=device)  # all_gather needs equal sizes
        padded[: flat.numel()] = flat
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded, group=group)
        out = []
        for i, shape in enumerate(shapes):
            # Rank r's slice of matrix i starts after its slices of the matrices before i.
            pieces = [gathered[r].narrow(0, sum(per_rank[r][:i]), per_rank[r][i]) for r in range(world)]
            o = newton_schulz(torch.cat(pieces).view(shape)).reshape(-1)
            out.append(o.narrow(0, sum(per_rank[r][i] for r in range(rank)), per_rank[rank][i]))
        return out


def split_muon_groups(
    groups: list[dict[str, Any]], matrices: dict[int, tuple[int, int]], lr: float
) -> list[dict[str, Any]]:
    """AdamW parameter groups (`params`, `param_names`, `weight_decay`) with every parameter whose id is in
    `matrices` (id -> its (rows, columns)) moved into a Muon group of its own, first, at learning rate `lr`. Keeps
    each group's weight decay; a Muon matrix comes from a decayed group."""
    muon: dict[str, list[Any]] = {"params": [], "param_names": [], "shapes": []}
    rest, decay = [], None
    for group in groups:
        keep = {"params": [], "param_names": []}
        for p, name in zip(group["params"], group["param_names"]):
            if id(p) in matrices:
                muon["params"].append(p), muon["param_names"].append(name), muon["shapes"].append(matrices[id(p)])
                decay = group["weight_decay"]
            else:
                keep["params"].append(p), keep["param_names"].append(name)
        rest.append({**group, **keep})
    if not muon["params"]:
        return rest
    return [{**muon, "weight_decay": decay, "lr": lr, "use_muon": True}, *rest]
