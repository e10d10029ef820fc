"""Image data: the built-in digits split, image folders (incl. broken files), Hugging Face image folders, mode
conversion, transforms and the errors a user meets first."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from polyformer.data.digits import DIGIT_NAMES, load_digits_split
from polyformer.data.images import AugmentConfig, ImageDataModule, eval_transform, to_channels, train_transform


def make_folder(root: Path, per_class: int = 6, size: int = 12, mode: str = "RGB") -> Path:
    """Two classes a model can tell apart: the bright half is left ("left") or right ("right")."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(["left", "right"]):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            half = slice(0, size // 2) if label == 0 else slice(size // 2, size)
            pixels[:, half] += 180
            Image.fromarray(pixels).convert(mode).save(root / name / f"{i}.png")
    return root


# ---- digits -------------------------------------------------------------------------------------------------------
def test_digits_splits_are_disjoint_stratified_and_the_test_split_is_fixed():
    sizes = {}
    for split in ("train", "val", "test"):
        images, labels = load_digits_split(split)
        assert images.dtype == torch.uint8 and images.shape[1:] == (1, 8, 8) and labels.dtype == torch.int64
        assert images.max() == 255 and torch.bincount(labels, minlength=10).min() > 0.9 * len(labels) / 10 - 2
        sizes[split] = len(labels)
    assert sizes == {"train": 1257, "val": 180, "test": 360}
    assert torch.equal(load_digits_split("test", seed=0)[0], load_digits_split("test", seed=7)[0])
    assert not torch.equal(load_digits_split("val", seed=0)[0], load_digits_split("val", seed=7)[0])
    flat = {tuple(x.flatten().tolist()) for s in ("train", "val", "test") for x in load_digits_split(s)[0]}
    assert len(flat) > 1700  # no image in two splits (the raw data has a few duplicates of its own)
    assert len(DIGIT_NAMES) == 10 and DIGIT_NAMES[3] == "three"
    with pytest.raises(ValueError, match="'dev'"):
        load_digits_split("dev")  # type: ignore[arg-type]


def test_digits_data_module_provides_what_the_task_links():
    dm = ImageDataModule(batch_size=32)
    dm.setup("fit")
    assert (dm.num_classes, dm.image_size, dm.channels, dm.class_names) == (10, 8, 1, DIGIT_NAMES)
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (32, 1, 8, 8) and images.dtype == torch.float32 and labels.shape == (32,)
    assert images.min() >= -1.0 and images.max() <= 1.0  # normalised with mean = std = 0.5
    val_images, _ = next(iter(dm.val_dataloader()))
    assert dm.denormalize(val_images).dtype == torch.uint8
    assert sum(len(b[1]) for b in dm.test_dataloader()) == 360


# ---- mode conversion and transforms -----------------------------------------------------------------------------
@pytest.mark.parametrize("channels", [1, 3])
def test_any_image_mode_becomes_the_configured_channel_count(channels):
    rgb = Image.fromarray(np.full((5, 7, 3), 200, np.uint8))
    images = {
        "RGB": rgb,
        "RGBA": rgb.convert("RGBA"),
        "L": rgb.convert("L"),
        "LA": rgb.convert("LA"),
        "P": rgb.convert("P"),
        "1": rgb.convert("1"),
        "I;16": Image.fromarray(np.full((5, 7), 200 * 257, np.uint16)),
        "CMYK": rgb.convert("CMYK"),
    }
    for mode, image in images.items():
        out = to_channels(image, channels)
        assert out.shape == (channels, 5, 7) and out.dtype == torch.uint8, mode
        if mode in ("RGB", "RGBA", "L", "I;16"):
            assert (out.int() - 200).abs().max() <= 1, (mode, out.unique())  # 16-bit rescaled, not clipped to 255
    grey = torch.full((1, 4, 4), 9, dtype=torch.uint8)
    assert to_channels(grey, 3).shape == (3, 4, 4)
    rgba = torch.stack([torch.full((4, 4), v, dtype=torch.uint8) for v in (10, 20, 30, 255)])
    assert torch.equal(to_channels(rgba, 3), rgba[:3]) and to_channels(rgba, 1).shape == (1, 4, 4)
    with pytest.raises(ValueError, match="channels must be 1"):
        to_channels(grey, 2)


@pytest.mark.parametrize("auto_augment", ["none", "randaugment", "trivialaugment"])
@pytest.mark.parametrize("channels", [1, 3])
def test_train_and_eval_transforms_give_the_model_input_shape(auto_augment, channels):
    aug = AugmentConfig(auto_augment=auto_augment, random_erasing=0.5)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8))
    mean, std = (0.5,) * channels, (0.25,) * channels
    x = train_transform(16, channels, mean, std, aug)(image)
    assert x.shape == (channels, 16, 16) and x.dtype == torch.float32
    y = eval_transform(16, channels, mean, std, crop_pct=0.875)(image)
    assert y.shape == (channels, 16, 16)
    assert torch.equal(y, eval_transform(16, channels, mean, std, crop_pct=0.875)(image))  # eval is deterministic


@pytest.mark.parametrize("crop", ["random_resized", "padded"])
def test_crop_modes_accept_any_source_size(crop):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8))
    x = train_transform(16, 3, (0.5,) * 3, (0.5,) * 3, AugmentConfig(crop=crop, hflip=0.0))(image)
    assert x.shape == (3, 16, 16)


def test_padded_crop_shifts_the_image_without_resampling_it():
    """crop: padded moves the pixels by at most crop_padding and fills with black; nothing is blurred."""
    torch.manual_seed(0)
    pixels = torch.zeros(1, 8, 8, dtype=torch.uint8)
    pixels[0, 2:6, 3] = 255  # a vertical stroke
    transform = train_transform(8, 1, (0.0,), (1.0,), AugmentConfig(crop="padded", crop_padding=1, hflip=0.0))
    shifts = set()
    for _ in range(200):
        x = transform(pixels)
        assert set(x.unique().tolist()) <= {0.0, 1.0}  # no interpolated grey
        assert x.sum() == 4  # the whole stroke stays inside: a shift of one pixel at most
        rows, cols = (x[0] == 1).nonzero(as_tuple=True)
        shifts.add((int(rows.min()) - 2, int(cols.min()) - 3))
    assert shifts == {(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}  # every shift of up to one pixel


def test_bad_augment_values_name_the_field():
    with pytest.raises(ValueError, match="crop_scale"):
        AugmentConfig(crop_scale=(0.5, 1.5))
    with pytest.raises(ValueError, match="crop_padding"):
        AugmentConfig(crop="padded", crop_padding=-1)
    with pytest.raises(ValueError, match="hflip"):
        AugmentConfig(hflip=2.0)


# ---- folders ------------------------------------------------------------------------------------------------------
def test_image_folder_with_class_subfolders_is_split_and_converted(tmp_path):
    root = make_folder(tmp_path / "imgs", mode="RGBA")
    (root / "left" / "notes.txt").write_text("not an image")  # ignored: not an image extension
    dm = ImageDataModule("folder", str(root), image_size=8, channels=1, batch_size=4, val_fraction=0.34)
    dm.setup("fit")
    assert dm.class_names == ["left", "right"] and dm.num_classes == 2
    assert len(dm.splits["train"]) == 8 and len(dm.splits["val"]) == 4  # 2 of 6 per class held out
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 1, 8, 8)


def test_image_folder_with_train_and_val_folders(tmp_path):
    make_folder(tmp_path / "train")
    make_folder(tmp_path / "val", per_class=2)
    dm = ImageDataModule("folder", str(tmp_path), image_size=8, batch_size=4)
    dm.setup("fit")
    assert len(dm.splits["train"]) == 12 and len(dm.splits["val"]) == 4 and len(dm.splits["test"]) == 4


def test_corrupt_and_truncated_images_are_skipped_with_a_count_or_fail_on_request(tmp_path):
    root = make_folder(tmp_path / "imgs", per_class=4)
    good = (root / "left" / "0.png").read_bytes()
    (root / "left" / "1.png").write_bytes(good[: len(good) // 2])  # truncated
    (root / "right" / "0.png").write_bytes(b"this is not a png")  # corrupt
    dm = ImageDataModule("folder", str(root), image_size=8, batch_size=2, val_fraction=0.25)
    dm.setup("fit")
    files = dm.splits["train"].base.dataset  # the ImageFiles under the train/val subsets: all 8 files
    with pytest.warns(UserWarning, match="skipped unreadable image") as caught:
        items = [files[i] for i in range(len(files))]
    assert all(image.size == (12, 12) for image, _ in items)  # a readable image stands in for each broken one
    messages = [str(w.message) for w in caught if "skipped unreadable" in str(w.message)]
    assert len(messages) == 2 and "1.png" in messages[0] and "2 skipped so far" in messages[1]
    images, _ = next(iter(dm.train_dataloader()))  # and the loader yields full batches
    assert images.shape == (2, 3, 8, 8)

    dm = ImageDataModule("folder", str(root), image_size=8, batch_size=2, on_bad_image="error", val_fraction=0.25)
    dm.setup("fit")
    files = dm.splits["train"].base.dataset
    with pytest.raises(ValueError, match=r"unreadable image .*left/1\.png.*on_bad_image=skip"):
        [files[i] for i in range(len(files))]


def test_missing_folder_empty_folder_and_too_small_split_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        ImageDataModule("folder", str(tmp_path / "nowhere")).setup("fit")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        ImageDataModule("folder", str(tmp_path / "empty")).setup("fit")
    (tmp_path / "noimages" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="no image files"):
        ImageDataModule("folder", str(tmp_path / "noimages")).setup("fit")
    with pytest.raises(ValueError, match="needs --data.root"):
        ImageDataModule("folder")
    dm = ImageDataModule("folder", str(make_folder(tmp_path / "small", per_class=3)), batch_size=64)
    dm.setup("fit")
    with pytest.raises(ValueError, match="fewer than one batch.*batch_size to at most 4"):
        dm.train_dataloader()
    with pytest.raises(FileNotFoundError, match="download=true"):
        ImageDataModule("cifar10", str(tmp_path / "no-cifar")).setup("fit")


def test_hugging_face_local_imagefolder_and_offline_hub_name(tmp_path):
    make_folder(tmp_path / "hf" / "train")
    make_folder(tmp_path / "hf" / "test", per_class=2, mode="L")
    dm = ImageDataModule("huggingface", str(tmp_path / "hf"), image_size=8, batch_size=4, val_fraction=0.0)
    dm.setup("fit")
    assert dm.class_names == ["left", "right"]
    assert len(dm.splits["train"]) == 12 and len(dm.splits["val"]) == 4  # no val split: the test split
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (4, 3, 8, 8) and set(labels.tolist()) <= {0, 1}
    with pytest.raises(ConnectionError, match="offline, point --data.root"):
        ImageDataModule("huggingface", "some-user/no-such-dataset-xyz").setup("fit")
