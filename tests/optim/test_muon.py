"""Muon (polyformer.optim.muon) against its formulas: the Newton-Schulz iteration's singular values, one step by hand,
AdamW groups equal to torch's AdamW, which parameters Muon gets, and a state-dict round trip that resumes exactly.
Multi-process runs (DDP, FSDP) are tests/scale/test_muon_sharded.py and the parity matrix's lm-muon cells."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from polyformer.backbone import TransformerConfig
from polyformer.models.gpt import GPT, GPTConfig
from polyformer.optim import Muon, newton_schulz, split_muon_groups, update_scale
from polyformer.tasks.base import OptimizerConfig, hidden_matrices, weight_decay_groups


@pytest.mark.parametrize("shape", [(32, 96), (96, 32), (64, 256), (48, 64), (128, 128)])
def test_newton_schulz_maps_every_singular_value_near_one(shape):
    torch.manual_seed(0)
    g = torch.randn(*shape) * 1e-3  # the scale is normalised away
    o = newton_schulz(g)
    assert o.shape == shape and o.dtype == torch.float32
    u, s_in, vh = torch.linalg.svd(g, full_matrices=False)
    s = torch.linalg.svdvals(o)  # both descending: the iteration is monotonic on [0, 1]
    # The published quintic's band: it overshoots and undershoots 1 rather than converging. Five steps lift a singular
    # value from ~2e-3 of ||G||_F into the band (the slope at 0 is a^5 ~ 485); a square Gaussian matrix has smaller
    # ones (its smallest singular value is ~0), which stay below: those directions get a smaller step.
    lifted = s_in / g.norm() > 2e-3
    assert lifted.sum() >= 0.95 * min(shape)
    assert s[lifted].min() > 0.65 and s.max() < 1.25, (s[lifted].min(), s.max())
    # Same singular vectors as g: O is close to U V^T (the exact orthogonal factor), entrywise within the band.
    cosine = (o * (u @ vh)).sum() / (o.norm() * (u @ vh).norm())
    assert cosine > 0.98


def test_newton_schulz_refuses_non_matrices():
    with pytest.raises(ValueError, match="orthogonalises matrices"):
        newton_schulz(torch.randn(3, 4, 5))


def test_one_step_equals_the_formula_by_hand():
    """W <- W (1 - lr wd) - lr 0.2 sqrt(max(m, n)) NS5(G + mu B), B = G after a first step from zero, in float64."""
    torch.manual_seed(0)
    w0, g = torch.randn(2, 3), torch.randn(2, 3)
    p = torch.nn.Parameter(w0.clone())
    p.grad = g.clone()
    lr, mu, wd = 0.1, 0.95, 0.01
    opt = Muon([{"params": [p], "use_muon": True, "weight_decay": wd}], lr=lr, momentum=mu)
    opt.step()

    x = (g + mu * g).double()  # Nesterov: G + mu B with B = mu * 0 + G
    x = x / x.norm()
    a, b, c = 3.4445, -4.7750, 2.0315
    for _ in range(5):  # a X + b X X^T X + c X X^T X X^T X, written out
        x = a * x + b * x @ x.T @ x + c * x @ x.T @ x @ x.T @ x
    expected = w0.double() * (1 - lr * wd) - lr * 0.2 * math.sqrt(3) * x
    torch.testing.assert_close(p.detach().double(), expected, rtol=1e-5, atol=1e-6)
    assert update_scale((2, 3)) == update_scale((3, 2)) == pytest.approx(0.2 * math.sqrt(3))
    # The update's RMS is 0.2 lr, AdamW's typical one (on a matrix large enough for the NS band to average out).
    torch.testing.assert_close(
        (newton_schulz(torch.randn(64, 256)) * update_scale((64, 256))).square().mean().sqrt(),
        torch.tensor(0.2),
        atol=0.03,
        rtol=0,
    )


def test_adamw_groups_take_torch_adamw_steps():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    kw = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8}
    ours = Muon([{"params": params, "weight_decay": 0.1}], **kw)
    torch_adamw = torch.optim.AdamW(twins, weight_decay=0.1, foreach=False, **kw)
    for _ in range(4):
        grads = [torch.randn_like(p) for p in params]
        for p, q, g in zip(params, twins, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step(), torch_adamw.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def gpt(**backbone) -> GPT:
    torch.manual_seed(0)
    cfg = TransformerConfig(width=32, depth=2, heads=4, max_len=16, causal=True, dropout=0.0, position="learned",
                            **backbone)  # fmt: skip
    return GPT(GPTConfig(cfg, vocab_size=50, tie_embeddings=False))


def muon_optimizer(model: torch.nn.Module, lr: float = 1e-2) -> Muon:
    groups = split_muon_groups(weight_decay_groups(model, 0.1), hidden_matrices(model), lr=lr)
    return Muon(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def test_only_the_backbones_hidden_matrices_go_to_muon():
    model = gpt(qk_norm=True, activation="swiglu")
    groups = muon_optimizer(model).param_groups
    muon = [g for g in groups if g["use_muon"]]
    assert len(muon) == 1 and groups[0] is muon[0]
    expected = sorted(n for n, p in model.named_parameters() if n.startswith("backbone.blocks") and p.ndim == 2)
    assert sorted(muon[0]["param_names"]) == expected and len(expected) == 2 * 4  # qkv, proj, fc1, fc2 per block
    assert muon[0]["weight_decay"] == 0.1
    assert muon[0]["shapes"] == [tuple(p.shape) for p in muon[0]["params"]]
    adamw = {n: g["weight_decay"] for g in groups[1:] for n in g["param_names"]}
    assert adamw["embed.weight"] == adamw["head.weight"] == 0.1  # embedding and head: AdamW, decayed
    assert adamw["backbone.positions.weight"] == 0.0
    assert {n for n in adamw if "norm" in n or n.endswith("bias")} <= {n for n, wd in adamw.items() if wd == 0.0}
    assert "backbone.blocks.0.attn.q_norm.weight" in adamw
    assert len(adamw) + len(expected) == len(list(model.parameters()))


def test_task_configure_optimizers_builds_the_hybrid_and_adamw_stays_torchs():
    from polyformer.tasks.language_model import LanguageModel

    backbone = TransformerConfig(width=32, depth=1, heads=4, max_len=16, causal=True, dropout=0.0)
    for name, kind in (("muon", Muon), ("adamw", torch.optim.AdamW)):
        task = LanguageModel(backbone=backbone, vocab_size=50, optimizer=OptimizerConfig(name=name, max_steps=10))
        opt = task.configure_optimizers()["optimizer"]
        assert type(opt) is kind
    muon_cfg = OptimizerConfig(name="muon", max_steps=10, lr=1e-3, muon_lr=2e-2, muon_momentum=0.9)
    task = LanguageModel(backbone=backbone, vocab_size=50, optimizer=muon_cfg)
    groups = task.configure_optimizers()["optimizer"].param_groups
    assert [g["initial_lr"] for g in groups] == [2e-2, 1e-3, 1e-3] and groups[0]["momentum"] == 0.9


def train(model: GPT, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        tokens = torch.randint(0, 50, (4, 9), generator=gen)
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_state_dict_round_trip_resumes_exactly(tmp_path):
    straight = gpt()
    opt = muon_optimizer(straight)
    train(straight, opt, 3, seed=1)
    torch.save({"model": straight.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    train(straight, opt, 3, seed=2)

    resumed = gpt()
    opt2 = muon_optimizer(resumed)
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    assert opt2.param_groups[0]["use_muon"] and opt2.param_groups[0]["shapes"] == opt.param_groups[0]["shapes"]
    train(resumed, opt2, 3, seed=2)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_muon_trains_a_tiny_model():
    model = gpt()
    opt = muon_optimizer(model, lr=3e-3)
    tokens = torch.randint(0, 50, (4, 9), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_unsharded_muon_refuses_flat_parameters_without_a_process_group():
    p = torch.nn.Parameter(torch.randn(6))
    with pytest.raises(ValueError, match="not whole matrices"):
        Muon([{"params": [p], "use_muon": True, "shapes": [(2, 3)]}])
