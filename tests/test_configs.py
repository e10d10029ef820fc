"""Every YAML under configs/ parses against the real CLI schema (typos, wrong types and stale keys fail here).

Task presets parse alone; the composable pieces (trainer/, logger/) parse on top of the LM preset, the way
users combine them: `polyformer fit --config configs/trainer/ddp.yaml --config configs/lm/tiny.yaml`.
"""

import contextlib
import io
from pathlib import Path

import pytest
import yaml

from polyformer.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PIECES = {"trainer", "logger"}
BASE_TASK = CONFIGS / "lm" / "tiny.yaml"

ALL = sorted(CONFIGS.rglob("*.yaml"))
TASK_PRESETS = [p for p in ALL if p.parent.name not in PIECES]
PIECE_FILES = [p for p in ALL if p.parent.name in PIECES]


def parse(*configs: Path, extra: tuple[str, ...] = ()) -> dict:
    args = ["fit"]
    for c in configs:
        args += ["--config", str(c)]
    args += extra
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code in (0, None), out.getvalue()
    return yaml.safe_load(out.getvalue())


def test_there_is_a_preset_for_every_task():
    folders = {p.parent.name for p in TASK_PRESETS}
    assert {"lm", "translation", "vit", "clip"} <= folders, folders


@pytest.mark.parametrize("preset", TASK_PRESETS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_task_preset_parses(preset):
    resolved = parse(preset)
    assert resolved["model"]["class_path"].startswith("polyformer.tasks.")
    assert resolved["data"]["class_path"].startswith("polyformer.data.")


@pytest.mark.parametrize("piece", PIECE_FILES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_composable_piece_parses_on_top_of_a_task(piece):
    resolved = parse(piece, BASE_TASK)
    assert resolved["model"]["class_path"].startswith("polyformer.tasks.")


def test_presets_keep_resumable_checkpoints_and_short_callback_names_still_resolve():
    """Presets use our ResumableCheckpoint; the everyday `+=ModelCheckpoint` must still mean Lightning's class."""
    for preset in TASK_PRESETS:
        paths = [c["class_path"] for c in parse(preset)["trainer"]["callbacks"]]
        assert "polyformer.checkpointing.ResumableCheckpoint" in paths, (preset, paths)
    resolved = parse(BASE_TASK, extra=("--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.dirpath=ckpt"))
    assert resolved["trainer"]["callbacks"][-1]["class_path"] == "lightning.pytorch.callbacks.ModelCheckpoint"


def test_every_preset_key_is_commented():
    """Presets are documentation: each file starts with a comment saying what it is for."""
    for path in ALL:
        first = path.read_text().lstrip().splitlines()[0]
        assert first.startswith("#"), f"{path} should start with a comment describing the preset"
