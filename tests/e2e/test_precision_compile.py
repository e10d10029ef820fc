"""Precision presets and the compile / activation-checkpointing switches, through the CLI.

- bf16-mixed and bf16-true fit on CPU (bf16 weights only with bf16-true);
- fp16 mixed precision with gradient scaling needs a GPU: on a CPU Lightning silently trains bf16 instead, so that
  test runs only where CUDA exists (and is skipped, saying so, elsewhere);
- `compile: true` (with activation checkpointing) under 2-process DDP: the backbone really runs compiled inside the
  Lightning Trainer, and its losses agree with the eager run's.
"""

from __future__ import annotations

import math

import pytest
import torch
from e2e.scaleout import CONFIGS, last_checkpoint, polyformer, probe_args, read_probe, task_args


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("polyformer-cache")


def fit(tmp_path, cache, name: str, trainer: str, extra: list[str], steps: int = 3, env: dict | None = None):
    out = tmp_path / name
    polyformer(["fit", *task_args("lm", trainer=trainer), f"--trainer.max_steps={steps}",
                "--trainer.limit_val_batches=0", f"--trainer.default_root_dir={out / 'run'}", *extra,
                *probe_args(out / "probe")], tmp_path, cache, env=env)  # fmt: skip
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("preset", "dtype"), [("bf16-mixed", "torch.float32"), ("bf16-true", "torch.bfloat16")])
def test_bf16_fits_on_cpu(preset, dtype, tmp_path, cache):
    out = fit(tmp_path, cache, preset, "cpu.yaml", [f"--config={CONFIGS / 'trainer' / f'{preset}.yaml'}"])
    probe = read_probe(out / "probe", 0)
    assert probe["param_dtype"] == dtype
    assert len(probe["losses"]) == 3 and all(math.isfinite(x) for x in probe["losses"]), probe["losses"]
    ckpt = torch.load(last_checkpoint(out), weights_only=True)
    assert ckpt["global_step"] == 3
    assert {str(t.dtype) for t in ckpt["state_dict"].values() if t.is_floating_point()} == {dtype}


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 mixed precision needs a CUDA GPU (on CPU it is bf16)")
def test_fp16_mixed_with_grad_scaling_on_gpu(tmp_path, cache):
    out = fit(tmp_path, cache, "fp16", "gpu.yaml", [f"--config={CONFIGS / 'trainer' / 'fp16-mixed.yaml'}"])
    probe = read_probe(out / "probe", 0)
    assert all(math.isfinite(x) for x in probe["losses"]), probe["losses"]
    ckpt = torch.load(last_checkpoint(out), weights_only=True)
    assert "native_amp_scaling_state" in ckpt, "no GradScaler state: this was not fp16 with loss scaling"
    assert ckpt["native_amp_scaling_state"]["scale"] > 0


@pytest.mark.slow
def test_compile_and_activation_checkpointing_match_eager_under_ddp(tmp_path, cache):
    # fp32 and no dropout: the two runs differ only in how the same arithmetic is executed.
    same = ["--model.init_args.backbone.dropout=0.0", "--trainer.precision=32-true"]
    env = {"TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor")}
    eager = fit(tmp_path, cache, "eager", "ddp-cpu.yaml", same, env=env)
    switched = [f"--config={CONFIGS / 'trainer' / name}" for name in ("compile.yaml", "activation-checkpointing.yaml")]
    compiled = fit(tmp_path, cache, "compiled", "ddp-cpu.yaml", [*switched, *same], env=env)
    for rank in (0, 1):
        e, c = read_probe(eager / "probe", rank), read_probe(compiled / "probe", rank)
        assert not e["compiled"] and e["dynamo_graphs"] == 0
        assert c["compiled"] and c["dynamo_graphs"] > 0, f"rank {rank}: the backbone did not run compiled: {c}"
        print(f"rank {rank}: eager losses {e['losses']}, compiled {c['losses']}")
        assert len(e["losses"]) == len(c["losses"]) == 3
        for step, (a, b) in enumerate(zip(e["losses"], c["losses"])):
            assert math.isclose(a, b, rel_tol=1e-4), f"rank {rank} step {step}: eager {a} vs compiled {b}"
