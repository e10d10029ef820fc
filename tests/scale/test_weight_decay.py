"""Weight decay is decided by what each parameter is (the weight of a linear map, convolution or embedding), so
FSDP's flattened 1-D shards (Lightning wraps the model before `configure_optimizers`, `use_orig_params=True`) get the
same groups as the unwrapped model. Before, `p.ndim < 2` decided: under FSDP every parameter lost its decay."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from scale.tiny_tasks import tiny_tasks

from polyformer.tasks.base import clean_name, weight_decay_groups

HERE = Path(__file__).resolve().parent


def grouped_names(groups) -> list:
    return [[g["weight_decay"], sorted(g["param_names"])] for g in groups]


def test_groups_follow_the_modules():
    (_, decay), (_, no_decay) = grouped_names(weight_decay_groups(tiny_tasks()["clip"], 0.1))
    assert {"model.image.patch.proj.weight", "model.text.embed.weight", "model.image_proj.weight"} <= set(decay)
    for name in ("logit_scale", "image.pos_embed", "image.patch.cls_token", "text.encoder.positions.weight",
                 "image.encoder.blocks.0.norm1.weight", "image.encoder.blocks.0.attn.qkv.bias"):  # fmt: skip
        assert f"model.{name}" in no_decay, name
    assert not set(decay) & set(no_decay)


def test_tied_weights_appear_once():
    lm = tiny_tasks()["lm"]
    groups = weight_decay_groups(lm, 0.1)
    (_, decay), (_, no_decay) = grouped_names(groups)
    assert "model.embed.weight" in decay and "model.head.weight" not in decay + no_decay  # the head *is* the embedding
    unique = {id(p): p for p in lm.parameters()}.values()
    assert sum(p.numel() for p in unique) == sum(p.numel() for g in groups for p in g["params"])


@pytest.mark.slow
def test_fsdp_sharded_model_keeps_its_weight_decay(tmp_path):
    out = tmp_path / "groups.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get(
        "PYTHONPATH", "")])}  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "fsdp_groups_worker.py"), str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    sharded = json.loads(out.read_text())
    for task, model in tiny_tasks().items():
        assert sharded[task]["flat"], f"{task}: FSDP did not flatten the parameters; the test checks nothing"
        unwrapped = grouped_names(weight_decay_groups(model, 0.1))
        print(f"{task}: decay/no-decay {len(unwrapped[0][1])}/{len(unwrapped[1][1])} unwrapped, "
              f"{len(sharded[task]['groups'][0][1])}/{len(sharded[task]['groups'][1][1])} sharded")  # fmt: skip
        assert sharded[task]["groups"] == unwrapped and unwrapped[0][1], task


def test_clean_name_strips_wrappers():
    name = "_fsdp_wrapped_module.backbone._checkpoint_wrapped_module.blocks.0._orig_mod.w"
    assert clean_name(name) == "backbone.blocks.0.w"
