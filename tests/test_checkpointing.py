"""`polyformer.checkpointing`: checkpoints written by older polyformer code (tests/fixtures/format1/, see its README)
still load with `load_task` and resume through the CLI, and the package stays importable without the tasks."""

import json
import math
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, run_cli

from polyformer.backbone import TransformerConfig
from polyformer.checkpointing import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    ResumableCheckpoint,
    load_checkpoint,
    load_task,
    read_checkpoint,
    upgrade,
)
from polyformer.models.clip import ImageEncoderConfig, TextEncoderConfig
from polyformer.tasks.contrastive import CLIP
from polyformer.tasks.language_model import LanguageModel

FORMAT1 = ROOT / "tests" / "fixtures" / "format1"

# The flags lm.ckpt was trained with: `fit --ckpt_path` rebuilds the model from the config, not from the checkpoint.
LM_FLAGS = [
    "--config", str(ROOT / "configs" / "lm" / "tiny.yaml"),
    "--model.init_args.backbone.width=16", "--model.init_args.backbone.depth=1",
    "--model.init_args.backbone.heads=2", "--model.init_args.backbone.max_len=16",
    "--model.init_args.samples.prompts=[]", "--data.init_args.block_size=16", "--data.init_args.batch_size=4",
    "--data.init_args.bpe_vocab_size=300", "--trainer.limit_val_batches=0", "--trainer.logger=false",
    "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
]  # fmt: skip


def test_every_module_imports_without_importing_the_tasks():
    # The tasks import polyformer.checkpointing (their metadata): importing a task from here would be a cycle.
    probe = (
        "import importlib, json, pkgutil, sys\n"
        "import polyformer.checkpointing as c\n"
        "names = [m.name for m in pkgutil.iter_modules(c.__path__, 'polyformer.checkpointing.')]\n"
        "for n in names: importlib.import_module(n)\n"
        "print(json.dumps([names, sorted(m for m in sys.modules if m.startswith('polyformer.tasks'))]))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    names, tasks = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"polyformer.checkpointing.files", "polyformer.checkpointing.loading"} <= set(names), names
    assert tasks == [], f"importing polyformer.checkpointing imported {tasks}"


def test_format1_lm_loads_and_generates():
    model = load_task(FORMAT1 / "lm.ckpt", expected=LanguageModel)
    assert model.tokenizer is not None and model.tokenizer.vocab_size == 300
    [text] = model.generate_text(["The"], max_new_tokens=8, seed=0)
    assert isinstance(text, str) and text
    logits = model(torch.tensor([[model.tokenizer.bos_id, *model.tokenizer.encode("The class")]]))
    assert logits.shape[-1] == 300 and torch.isfinite(logits).all()


def test_format1_clip_with_a_scalar_logit_scale_loads():
    assert read_checkpoint(FORMAT1 / "clip.ckpt")["state_dict"]["logit_scale"].ndim == 0  # the old layout
    model = load_task(FORMAT1 / "clip.ckpt", expected=CLIP)
    assert model.model.logit_scale.shape == (1,)
    probs = model.score(torch.randn(2, 1, 8, 8), ["a photo of the digit 3", "a photo of the digit 7"])
    assert probs.shape == (2, 2) and torch.isfinite(probs).all()
    assert torch.allclose(probs.sum(-1), torch.ones(2))
    assert math.isfinite(model.model.scale().item())


def test_format1_clip_initialises_another_run_through_init_from():
    """`init_from=<old .ckpt>` reads the weights without the task's checkpoint hooks, so the scalar logit scale of
    format 1 must be reshaped by the format upgrade itself, not by `CLIP.on_load_checkpoint` alone."""
    hparams = read_checkpoint(FORMAT1 / "clip.ckpt")["hyper_parameters"]
    stored = load_task(FORMAT1 / "clip.ckpt", expected=CLIP).model.state_dict()
    # The same architecture, built from the stored arguments: only the weights come from init_from.
    image = ImageEncoderConfig(**{**hparams["image"], "backbone": TransformerConfig(**hparams["image"]["backbone"])})
    text = TextEncoderConfig(TransformerConfig(**hparams["text"]["backbone"]))
    fresh = CLIP(image, text, hparams["embed_dim"], hparams["vocab_size"], hparams["eos_id"],
                 init_from=str(FORMAT1 / "clip.ckpt"))  # fmt: skip
    assert fresh.model.logit_scale.shape == (1,)
    for key, value in stored.items():
        assert torch.equal(fresh.model.state_dict()[key], value), key


def test_format1_callback_states_are_found_under_todays_keys():
    """The LM's metrics were renamed (val_loss -> val/loss) after format 1; Lightning finds a callback's state by a
    key that names the monitored metric, so `upgrade` renames it and the presets' checkpoint callback resumes."""
    ckpt = upgrade(load_checkpoint(FORMAT1 / "lm.ckpt"))
    assert ckpt["polyformer"]["format"] == CHECKPOINT_FORMAT
    today = ResumableCheckpoint(monitor="val/loss", save_last=True)
    assert today.state_key in ckpt["callbacks"], list(ckpt["callbacks"])
    assert ckpt["callbacks"][today.state_key]["monitor"] == "val/loss"
    assert "RNGState" in ckpt["callbacks"]  # keyed by class name: unchanged by the move into this package


def test_format1_and_2_weights_move_under_the_model_prefix():
    """Format 3: tasks hold their network as `self.model`, so every stored weight gains `model.`; the weights the
    task loads are exactly the fixture's."""
    old = load_checkpoint(FORMAT1 / "lm.ckpt")
    old_state = dict(old["state_dict"])
    new = upgrade(old)
    assert set(new["state_dict"]) == {f"model.{k}" for k in old_state}
    # Format 2 optimizer groups name their parameters (format 1's do not): the names follow the weights.
    format2 = {
        "polyformer": {"format": 2, "task": "polyformer.tasks.language_model.LanguageModel"},
        "state_dict": {"embed.weight": torch.zeros(1)},
        "optimizer_states": [{"param_groups": [{"param_names": ["embed.weight", "backbone.norm.bias"]}]}],
    }
    upgraded = upgrade(format2)
    assert list(upgraded["state_dict"]) == ["model.embed.weight"]
    assert upgraded["optimizer_states"][0]["param_groups"][0]["param_names"] == [
        "model.embed.weight",
        "model.backbone.norm.bias",
    ]
    task = load_task(FORMAT1 / "lm.ckpt", expected=LanguageModel)
    for key, value in old_state.items():
        assert torch.equal(task.state_dict()[f"model.{key}"], value), key


def test_a_checkpoint_of_a_newer_format_is_refused(tmp_path):
    ckpt = load_checkpoint(FORMAT1 / "lm.ckpt")
    ckpt["polyformer"]["format"] = CHECKPOINT_FORMAT + 1
    torch.save(ckpt, tmp_path / "future.ckpt")
    with pytest.raises(CheckpointError, match=f"format {CHECKPOINT_FORMAT + 1}; this polyformer reads formats"):
        load_task(tmp_path / "future.ckpt")


def test_format1_lm_resumes_through_the_cli(tmp_path):
    proc = run_cli(
        ["fit", *LM_FLAGS, "--trainer.max_steps=3", f"--trainer.default_root_dir={tmp_path / 'run'}",
         f"--ckpt_path={FORMAT1 / 'lm.ckpt'}"],
        cwd=tmp_path, env={"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "callbacks used to create the checkpoint" not in proc.stderr  # every callback state was found
    ckpt = read_checkpoint(tmp_path / "run" / "latest" / "checkpoints" / "last.ckpt")  # the fit's run directory
    assert ckpt["global_step"] == 3  # 2 steps from the fixture, then one more
    assert ckpt["polyformer"]["format"] == CHECKPOINT_FORMAT
    assert ckpt["optimizer_states"][0]["state"][0]["step"].item() == 3  # Adam's moments continued, not restarted
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert all(k.startswith("model.") for k in ckpt["state_dict"]), list(ckpt["state_dict"])[:5]
