"""Bad data through the CLI, as a careless user would give it: each case is either handled as documented (corrupt
images skipped with a counted warning, odd image modes converted) or stopped with one clear line before training.
"""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from faults.support import run_main
from PIL import Image

from polyformer.checkpointing.files import read_checkpoint
from polyformer.cli import main


# ---- text -----------------------------------------------------------------------------------------------------
def lm(config, *extra: str) -> list[str]:
    return ["fit", "--config", str(config), *extra]


def test_missing_text_file(capsys, tiny_lm_config, tmp_path):
    line = run_main(capsys, lm(tiny_lm_config(), f"--data.source={tmp_path / 'nope.txt'}"))
    assert "data.source: no files match" in line and "nope.txt" in line


def test_missing_text_folder(capsys, tiny_lm_config, tmp_path):
    line = run_main(capsys, lm(tiny_lm_config(), f"--data.source={tmp_path / 'no_such_dir'}"))
    assert "no_such_dir" in line and "network" not in line


def test_empty_text_file(capsys, tiny_lm_config, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    line = run_main(capsys, lm(tiny_lm_config(), "--data.source=empty.txt"))
    assert "empty.txt" in line and "empty" in line


def test_non_utf8_text(capsys, tiny_lm_config, tmp_path):
    (tmp_path / "latin1.txt").write_bytes(("Caf\xe9 cr\xe8me br\xfbl\xe9e. " * 400 + "\n\n").encode("latin-1") * 10)
    line = run_main(capsys, lm(tiny_lm_config(), "--data.source=latin1.txt"))
    assert "latin1.txt" in line and "UTF-8" in line


def test_split_smaller_than_one_block(capsys, tiny_lm_config, tmp_path):
    (tmp_path / "small.txt").write_text("A short text.\n\nAnother paragraph.\n")
    line = run_main(capsys, lm(tiny_lm_config(), "--data.source=small.txt"))
    assert "fewer than one block of data.block_size + 1 = 17" in line


def test_split_smaller_than_one_batch(capsys, tiny_lm_config, tmp_path):
    line = run_main(capsys, lm(tiny_lm_config(), "--data.batch_size=100000"))
    assert "data.batch_size" in line and "100000" in line
    assert not (tmp_path / "ckpts").exists()


def test_block_longer_than_the_context(capsys, tiny_lm_config):
    line = run_main(capsys, lm(tiny_lm_config(), "--data.block_size=64"))
    assert "data.block_size (64) exceeds model.backbone.max_len (32)" in line


def test_prompt_longer_than_the_context(capsys, lm_checkpoint):
    line = run_main(capsys, ["generate", "--ckpt", str(lm_checkpoint), "--prompt", "x" * 40, "--max-new-tokens", "5"])
    assert "exceed the model's context (backbone.max_len = 32)" in line


def test_hub_dataset_offline(capsys, tiny_lm_config):
    line = run_main(capsys, lm(tiny_lm_config(), "--data.source=wikitext", "--data.hub_config=wikitext-2-raw-v1"))
    assert "cannot load hub dataset 'wikitext'" in line and "needs the network" in line and "local files" in line


def test_hub_tokenizer_offline(capsys, tiny_lm_config):
    line = run_main(capsys, lm(tiny_lm_config(), "--data.tokenizer=gpt2"))
    assert "cannot fetch tokenizer 'gpt2'" in line and "needs the network" in line and "local tokenizer.json" in line


def test_tokenizer_that_does_not_match_the_checkpoint(capsys, tiny_lm_config, lm_checkpoint, tmp_path):
    vocab = read_checkpoint(lm_checkpoint)["polyformer"]["hyper_parameters"]["vocab_size"]
    tokenizer = tmp_path / "other.json"
    _small_bpe(tokenizer, vocab + 40)
    line = run_main(capsys, lm(tiny_lm_config(), f"--data.tokenizer={tokenizer}", f"--ckpt_path={lm_checkpoint}"))
    assert f"vocab_size is {vocab} in the checkpoint but {vocab + 40} in the config" in line


def _small_bpe(path, vocab_size: int) -> None:
    from polyformer.data.tokenizers import train_bpe

    words = [f"w{i} x{i % 7} y{i % 13} z{i * 7 % 31}" for i in range(3000)]
    tok = train_bpe(iter(words), vocab_size)
    assert tok.vocab_size == vocab_size, tok.vocab_size
    tok.save(path)


# ---- images ---------------------------------------------------------------------------------------------------
@pytest.fixture
def image_config(tmp_path):
    """An image folder with a truncated PNG, a non-image named .jpg, and grayscale / RGBA / 16-bit / odd-sized
    images among ordinary RGB ones; a tiny ViT config that reads every image once (one epoch)."""
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        folder = tmp_path / "images" / cls
        folder.mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"rgb{i}.png")
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8), "L").save(folder / "gray.png")
        Image.fromarray(rng.integers(0, 255, (8, 8, 4), dtype=np.uint8), "RGBA").save(folder / "rgba.png")
        Image.fromarray(rng.integers(0, 65535, (8, 8), dtype=np.uint16)).save(folder / "deep16.png")
        Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(folder / "odd_size.png")
    whole = (tmp_path / "images" / "cat" / "rgb0.png").read_bytes()
    (tmp_path / "images" / "cat" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "images" / "dog" / "not_an_image.jpg").write_text("hello")
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "max_epochs": 1, "logger": False, "enable_progress_bar": False,
            "enable_model_summary": False, "enable_checkpointing": False, "num_sanity_val_steps": 0,
        },
        "model": {
            "class_path": "polyformer.tasks.image_classification.ImageClassifier",
            "init_args": {"backbone": {"width": 16, "depth": 1, "heads": 2, "dropout": 0.0}, "patch_size": 4},
        },
        "data": {
            "class_path": "polyformer.data.images.ImageDataModule",
            "init_args": {
                "dataset": "folder", "root": "images", "image_size": 8, "batch_size": 4, "val_fraction": 0.25,
            },
        },
    }  # fmt: skip
    path = tmp_path / "vit.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_corrupt_images_are_skipped_with_a_counted_warning(image_config, capsys, recwarn):
    assert main(["fit", "--config", str(image_config)]) == 0, capsys.readouterr().err
    skipped = sorted(str(w.message) for w in recwarn if "skipped unreadable image" in str(w.message))
    assert len(skipped) == 2, skipped
    assert any("truncated.png" in m for m in skipped) and any("not_an_image.jpg" in m for m in skipped)
    assert any("1 skipped so far" in m for m in skipped) and any("2 skipped so far" in m for m in skipped)
    # grayscale, RGBA, 16-bit and odd-sized files were all converted and trained on: no other warning about them
    assert not [w for w in recwarn if any(k in str(w.message) for k in ("gray.png", "rgba.png", "deep16", "odd_size"))]


def test_corrupt_image_fails_when_asked(image_config, capsys):
    line = run_main(capsys, ["fit", "--config", str(image_config), "--data.on_bad_image=error"])
    assert "unreadable image" in line and ("truncated.png" in line or "not_an_image.jpg" in line)
    assert "--data.on_bad_image=skip" in line


def test_missing_image_folder(image_config, capsys, tmp_path):
    line = run_main(capsys, ["fit", "--config", str(image_config), f"--data.root={tmp_path / 'nowhere'}"])
    assert "image folder not found" in line and "nowhere" in line


def test_image_split_smaller_than_one_batch(image_config, capsys):
    line = run_main(capsys, ["fit", "--config", str(image_config), "--data.batch_size=64"])
    assert "fewer than one batch" in line and "--data.batch_size" in line


def test_patch_size_that_does_not_divide_the_image(image_config, capsys):
    line = run_main(capsys, ["fit", "--config", str(image_config), "--model.patch_size=3"])
    assert "image_size (8) must be divisible by patch_size (3)" in line and "patch_size in [1, 2, 4, 8]" in line
