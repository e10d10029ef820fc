"""The warmup-stable-decay schedule (Hägele et al. 2024) against its formula at the steps where it changes, and the
optimizer config's checks naming the key."""

from __future__ import annotations

import math

import pytest

from polyformer.tasks.base import OptimizerConfig, lr_multiplier


@pytest.mark.parametrize("shape", ["linear", "1-sqrt"])
def test_wsd_warms_up_holds_then_decays_over_the_last_fraction(shape):
    cfg = OptimizerConfig(schedule="wsd", warmup_steps=10, decay_fraction=0.2, decay_shape=shape, min_lr_ratio=0.1)
    total = 100  # decay over the last 20 steps: from step 80, reaching the floor at step 100
    at = {s: lr_multiplier(s, cfg, total) for s in range(total + 5)}
    assert at[0] == pytest.approx(0.1) and at[4] == pytest.approx(0.5) and at[9] == pytest.approx(1.0)
    assert all(at[s] == 1.0 for s in range(10, 81))  # stable, including the decay's first step
    for s in (85, 90, 99):
        p = (s - 80) / 20
        drop = p if shape == "linear" else math.sqrt(p)
        assert at[s] == pytest.approx(0.1 + 0.9 * (1 - drop))
    assert at[100] == at[104] == pytest.approx(0.1)  # the floor, also past max_steps
    assert all(at[s + 1] <= at[s] for s in range(10, total + 4))
    if shape == "1-sqrt":  # 1-sqrt drops faster early in the decay than linear
        assert at[85] < 0.1 + 0.9 * 0.75


def test_the_other_schedules_are_unchanged():
    cosine = OptimizerConfig(warmup_steps=10, min_lr_ratio=0.1)
    assert lr_multiplier(55, cosine, 100) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(39, OptimizerConfig(schedule="inverse_sqrt", warmup_steps=10), 100) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"schedule": "wsd2"}, "optimizer.schedule must be one of"),
        ({"decay_shape": "cosine"}, "optimizer.decay_shape must be one of"),
        ({"name": "sgd"}, "optimizer.name must be one of"),
        ({"decay_fraction": 0.0}, "optimizer.decay_fraction must be in"),
        ({"decay_fraction": 1.5}, "optimizer.decay_fraction must be in"),
        ({"muon_lr": -1.0}, "optimizer.muon_lr must be a finite number > 0"),
        ({"muon_momentum": 1.0}, "optimizer.muon_momentum must be in"),
    ],
)
def test_bad_values_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OptimizerConfig(**kwargs)
