"""Image classification data: scikit-learn's digits (built in), torchvision's CIFAR-10/100, `ImageFolder` trees and
Hugging Face `datasets` image datasets, with the ViT training transforms of DeiT (Touvron et al. 2021):
RandomResizedCrop, flips, RandAugment (Cubuk et al. 2020), TrivialAugment (Müller & Hutter 2021) or DeiT III's
3-Augment (Touvron et al. 2022), random erasing, normalisation; and the eval transform (resize to image_size /
crop_pct, centre crop). Mixup/CutMix act on whole batches and live in the task, next to the soft-target loss they need.

Images decode in DataLoader worker processes (`num_workers`) into pinned memory when a GPU is present.
Every source ends as a sequence of (image, label) with image a PIL image or a uint8 tensor (C, H, W).

Legend: B batch, C channels, H height, W width.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import tv_tensors
from torchvision.transforms import v2

from polyformer.data.digits import DIGIT_NAMES, load_digits_split
from polyformer.data.info import DataInfo
from polyformer.data.loading import ResumableLoader, eval_loader

Source = Literal["digits", "cifar10", "cifar100", "folder", "huggingface"]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
NATIVE_SIZE = {"digits": 8, "cifar10": 32, "cifar100": 32}  # folder / huggingface default to 224


# ---- transforms -------------------------------------------------------------------------------------------------
@dataclass
class AugmentConfig:
    """Training augmentation. The defaults are DeiT's minus RandAugment and erasing; presets set the rest."""

    # "random_resized": RandomResizedCrop (ImageNet recipes); "padded": pad by crop_padding pixels and take a random
    # image_size crop, i.e. translations of up to crop_padding pixels (the CIFAR recipe: pad 4, crop 32); at 8 or 32
    # pixels resizing a crop back up blurs strokes, which a shift does not.
    crop: Literal["random_resized", "padded"] = "random_resized"
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area fraction; (1.0, 1.0) = resize only
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    crop_padding: int = 4  # pixels, for crop: padded; padding is zeros, i.e. black before normalisation
    hflip: float = 0.5  # probability; 0 for data where mirroring changes the class (digits, text)
    # "3augment": DeiT III's (Touvron et al. 2022): per image one of grayscale / solarisation / Gaussian blur, then
    # colour jitter 0.3; DeiT III pairs it with a simple crop (crop: padded) instead of RandomResizedCrop.
    auto_augment: Literal["none", "randaugment", "trivialaugment", "3augment"] = "none"
    randaugment_ops: int = 2  # DeiT: rand-m9-mstd0.5, i.e. 2 ops at magnitude 9
    randaugment_magnitude: int = 9
    random_erasing: float = 0.0  # probability; DeiT uses 0.25

    def __post_init__(self) -> None:
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"augment.crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"augment.crop_ratio must satisfy 0 < low <= high, got {self.crop_ratio}")
        if self.crop_padding < 0:
            raise ValueError(f"augment.crop_padding is a number of pixels >= 0, got {self.crop_padding}")
        for name in ("hflip", "random_erasing"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"augment.{name} is a probability in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.randaugment_magnitude <= 30:
            raise ValueError(f"augment.randaugment_magnitude must be in [0, 30], got {self.randaugment_magnitude}")


def to_channels(image: Image.Image | Tensor, channels: int) -> Tensor:
    """Any PIL mode (1, L, LA, P, RGB, RGBA, CMYK, I;16, I, F) or uint8 tensor to a uint8 (channels, H, W) tensor.

    16-bit and float images are rescaled to 8 bits (PIL's own conversion clips them instead); alpha is dropped;
    colour becomes grey with the ITU-R 601 luma weights (PIL's "L") and grey is repeated to 3 channels.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
    if isinstance(image, Tensor):
        if image.dtype != torch.uint8 or image.ndim != 3:
            raise ValueError(f"image tensors must be uint8 (C, H, W), got {image.dtype} {tuple(image.shape)}")
        if image.shape[0] == channels:
            return image
        if image.shape[0] == 1:
            return image.expand(channels, -1, -1).contiguous()
        if channels == 3:  # RGBA: drop alpha
            return image[:3].contiguous()
        return v2.functional.rgb_to_grayscale(image[:3], num_output_channels=1)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = (
            1.0 if image.mode == "F" and array.max(initial=0) <= 1.0 else 65535.0 if array.max(initial=0) > 255 else 255
        )
        image = Image.fromarray(np.clip(np.rint(array * (255.0 / peak)), 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "P":
        image = image.convert("RGBA")  # palette images may carry transparency
    image = image.convert("L" if channels == 1 else "RGB")
    return (
        torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))
        .reshape(image.height, image.width, -1)
        .permute(2, 0, 1)
    )


def train_transform(
    image_size: int, channels: int, mean: Sequence[float], std: Sequence[float], augment: AugmentConfig
) -> Callable[[Any], Tensor]:
    steps: list[Any]
    if augment.crop == "padded":
        # Resize first so any source size works; for the built-in sets (already image_size) it is a no-op.
        steps = [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]
        steps.append(v2.RandomCrop(image_size, padding=augment.crop_padding, fill=0))
    else:
        steps = [v2.RandomResizedCrop(image_size, scale=augment.crop_scale, ratio=augment.crop_ratio, antialias=True)]
    if augment.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(augment.hflip))
    if augment.auto_augment == "randaugment":
        steps.append(v2.RandAugment(augment.randaugment_ops, augment.randaugment_magnitude))
    elif augment.auto_augment == "trivialaugment":
        steps.append(v2.TrivialAugmentWide())
    elif augment.auto_augment == "3augment":
        steps += three_augment(image_size, channels)
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if augment.random_erasing > 0:  # after normalisation, so erased pixels are 0 = the mean colour
        steps.append(v2.RandomErasing(augment.random_erasing, value=0.0))
    return _pipeline(channels, v2.Compose(steps))


def three_augment(image_size: int, channels: int) -> list[Any]:
    """DeiT III's 3-Augment (Touvron et al. 2022, section 3; their `new_data_aug_generator`): one of grayscale,
    solarisation (pixels >= 128 inverted) or Gaussian blur (sigma 0.1..2) chosen uniformly per image, then colour
    jitter 0.3 in brightness, contrast and saturation. Every draw is torch's global RNG, which the loader seeds per
    (seed, epoch, index), so a resumed run sees the same images. Grey images (channels 1) keep all three; grayscale
    is then the identity, as saturation jitter is."""
    # The blur kernel covers +-3 sigma at sigma 2; on small images it is cut to the largest odd size whose reflect
    # padding fits (at most 2 * side - 1).
    kernel = min(13, 2 * image_size - 1)
    choice = v2.RandomChoice(
        [v2.Grayscale(num_output_channels=channels), v2.RandomSolarize(128, p=1.0), v2.GaussianBlur(kernel, (0.1, 2.0))]
    )
    return [choice, v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3)]


def eval_transform(
    image_size: int, channels: int, mean: Sequence[float], std: Sequence[float], crop_pct: float = 1.0
) -> Callable[[Any], Tensor]:
    """Resize the short side to image_size / crop_pct, then centre-crop image_size (timm's eval crop)."""
    steps = [
        v2.Resize(math.floor(image_size / crop_pct), antialias=True),
        v2.CenterCrop(image_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ]
    return _pipeline(channels, v2.Compose(steps))


def _pipeline(channels: int, transform: v2.Compose) -> Callable[[Any], Tensor]:
    def apply(image: Image.Image | Tensor) -> Tensor:  # -> (C, H, W) float
        return transform(tv_tensors.Image(to_channels(image, channels))).as_subclass(Tensor)

    return apply


# ---- datasets ---------------------------------------------------------------------------------------------------
class Transformed(Dataset):
    """(image, label) pairs from `base` with `transform` applied to the image (in the worker that loads it)."""

    def __init__(self, base: Any, transform: Callable[[Any], Tensor]) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, label = self.base[index]
        return self.transform(image), int(label)


class TensorImages(Dataset):
    def __init__(self, images: Tensor, labels: Tensor) -> None:  # (N, C, H, W) uint8, (N,)
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])


class ImageFiles(Dataset):
    """Image files with labels. An unreadable file (truncated, corrupt, not an image) is replaced by the next
    readable one with a warning that counts the skipped files so far, or raises, as `on_bad_image` says."""

    def __init__(self, files: list[tuple[Path, int]], on_bad_image: Literal["skip", "error"] = "skip") -> None:
        self.files, self.on_bad_image = files, on_bad_image
        self.bad: set[Path] = set()  # per process: each worker counts what it met

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        for attempt in range(min(len(self.files), 32)):
            path, label = self.files[(index + attempt) % len(self.files)]
            try:
                with Image.open(path) as image:
                    image.load()  # decode now: a truncated file fails here, not later in a transform
                    return image, label
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                if self.on_bad_image == "error":
                    raise ValueError(
                        f"unreadable image {path}: {e}; remove it, or set --data.on_bad_image=skip to skip such files"
                    ) from None
                if path not in self.bad:
                    self.bad.add(path)
                    warnings.warn(
                        f"skipped unreadable image {path} ({type(e).__name__}: {e}); "
                        f"{len(self.bad)} skipped so far in this process",
                        stacklevel=2,
                    )
        raise ValueError(f"32 unreadable images in a row from {self.files[index][0]} on: is the folder corrupt?")


def list_image_folder(root: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """`root/<class>/**/<image>` -> (path, class index) sorted, and the sorted class names (torchvision's layout)."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}; expected {root}/<class name>/<image files>")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"no class folders in {root}: put the images of each class in {root}/<class name>/")
    files = [
        (path, label)
        for label, name in enumerate(classes)
        for path in sorted((root / name).rglob("*"))
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
    ]
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under the class folders of {root}")
    return files, classes


class HFImages(Dataset):
    def __init__(self, table: Any, image_column: str, label_column: str) -> None:
        self.table, self.image_column, self.label_column = table, image_column, label_column

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        row = self.table[index]
        return row[self.image_column], int(row[self.label_column])


# ---- the data module --------------------------------------------------------------------------------------------
class ImageDataModule(L.LightningDataModule):
    """Labelled images for classification. Provides `num_classes`, `image_size`, `channels`, `class_names`,
    `mean` and `std`, which the task reads (`info()`), and `denormalize` for callbacks that show images.

    Splits: a source's own train/val/test splits where it has them; a missing val split is `val_fraction` of train
    (seeded, stratified), or the test split when val_fraction is 0 (with a warning: model selection on val is then
    selection on the test set); a missing test split is the val split.
    """

    def __init__(
        self,
        dataset: Source = "digits",
        root: str | None = None,  # cifar: download folder; folder: the tree; huggingface: hub name or local path
        image_size: int | None = None,  # None = the source's native size (digits 8, CIFAR 32), else 224
        channels: int | None = None,  # None = the source's (digits 1, others 3); images are converted to this
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        seed: int = 0,
        augment: AugmentConfig | None = None,
        crop_pct: float = 1.0,  # eval: resize to image_size / crop_pct, centre crop (ImageNet: 0.875)
        mean: tuple[float, ...] | None = None,  # None = 0.5 per channel
        std: tuple[float, ...] | None = None,
        download: bool = False,  # CIFAR only
        image_column: str | None = None,  # huggingface: None = "image" or "img"
        label_column: str | None = None,  # huggingface: None = "label", "labels" or "fine_label"
        on_bad_image: Literal["skip", "error"] = "skip",  # folder: what an unreadable image file does
    ) -> None:
        super().__init__()
        # Values the task links from here are logged with the task's hyperparameters: Lightning refuses a key logged
        # by both with different values (the task's initial None against a value set here).
        self.save_hyperparameters(ignore=["image_size", "channels", "mean", "std"])
        if dataset in ("folder", "huggingface") and not root:
            raise ValueError(f"--data.dataset={dataset} needs --data.root (a folder, or a hub name for huggingface)")
        if image_size is not None and image_size < 1:
            raise ValueError(f"--data.image_size must be >= 1, got {image_size}")
        if channels not in (None, 1, 3):
            raise ValueError(f"--data.channels must be 1 or 3, got {channels}")
        if batch_size < 1 or not 0.0 <= val_fraction < 1.0 or not 0.0 < crop_pct <= 1.0:
            raise ValueError(
                f"need batch_size >= 1, 0 <= val_fraction < 1 and 0 < crop_pct <= 1; got {batch_size}, "
                f"{val_fraction}, {crop_pct}"
            )
        self.dataset, self.root = dataset, root
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.val_fraction, self.seed = num_workers, val_fraction, seed
        self.augment, self.crop_pct = augment or AugmentConfig(), crop_pct
        self.download, self.on_bad_image = download, on_bad_image
        self.image_column, self.label_column = image_column, label_column
        self.image_size = image_size or NATIVE_SIZE.get(dataset, 224)
        self.channels = channels or (1 if dataset == "digits" else 3)
        self.mean = tuple(mean or (0.5,) * self.channels)
        self.std = tuple(std or (0.5,) * self.channels)
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"--data.mean and --data.std need {self.channels} values (one per channel)")
        self.class_names: list[str] | None = list(DIGIT_NAMES) if dataset == "digits" else None
        self.num_classes: int | None = len(DIGIT_NAMES) if dataset == "digits" else None
        self.splits: dict[str, Dataset] = {}

    def prepare_data(self) -> None:
        if self.dataset in ("cifar10", "cifar100") and self.download:
            self._cifar(train=True)  # rank 0 downloads once, before the ranks set up
            self._cifar(train=False)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        raw = self._raw_splits()  # split -> (dataset of (image, label), its labels for stratifying)
        train, labels = raw["train"]
        if "val" not in raw and self.val_fraction > 0:
            keep, held = stratified_split(labels, self.val_fraction, self.seed)
            train, raw["val"] = Subset(train, keep), (Subset(train, held), None)
        if "val" not in raw and "test" not in raw:
            raise ValueError(f"{self._describe()} has only a train split: set --data.val_fraction > 0 to hold some out")
        if "val" not in raw:
            self._warn_validation_is_test()
        val = raw.get("val", raw.get("test"))[0]  # type: ignore[index]
        test = raw.get("test", (val, None))[0]
        for name, data in [("train", train), ("val", val), ("test", test)]:
            if len(data) == 0:
                raise ValueError(f"the {name} split of {self._describe()} is empty")
        eval_tf = eval_transform(self.image_size, self.channels, self.mean, self.std, self.crop_pct)
        self.splits = {
            "train": Transformed(
                train, train_transform(self.image_size, self.channels, self.mean, self.std, self.augment)
            ),
            "val": Transformed(val, eval_tf),
            "test": Transformed(test, eval_tf),
        }

    def _warn_validation_is_test(self) -> None:
        """Say so when validation falls back to the test split: every choice made on val metrics (best checkpoint,
        early stopping, a learning-rate sweep) is then made on the test set, and its test accuracy is optimistic.
        A warning, not an error: validating on the test split is a legitimate way to watch a run whose recipe was
        fixed beforehand. Once per data module: setup() builds the splits once."""
        callbacks = self.trainer.callbacks if self.trainer is not None else []
        monitors = sorted({str(c.monitor) for c in callbacks if str(getattr(c, "monitor", None)).startswith("val")})
        selected = (
            f"; callbacks monitoring {', '.join(monitors)} therefore select on the test set"
            if monitors
            else "; a checkpoint or early stopping on a val/ metric would select on the test set"
        )
        rank_zero_warn(
            f"{self._describe()}: the validation split is the test split (val_fraction=0 and no val split of its "
            f"own){selected}. Set --data.val_fraction (e.g. 0.1) to hold out validation images from train.",
            category=UserWarning,
        )

    def _describe(self) -> str:
        return self.dataset + (f" at {self.root}" if self.root else "")

    def _raw_splits(self) -> dict[str, tuple[Any, list[int] | None]]:
        if self.dataset == "digits":
            out = {}
            for split in ("train", "val", "test"):
                images, labels = load_digits_split(split, self.seed)  # type: ignore[arg-type]
                out[split] = (TensorImages(images, labels), labels.tolist())
            return out
        if self.dataset in ("cifar10", "cifar100"):
            train, test = self._cifar(train=True), self._cifar(train=False)
            self.class_names, self.num_classes = list(train.classes), len(train.classes)
            return {"train": (train, list(train.targets)), "test": (test, list(test.targets))}
        if self.dataset == "folder":
            return self._folder()
        return self._huggingface()

    def _cifar(self, train: bool) -> Any:
        from torchvision.datasets import CIFAR10, CIFAR100

        cls = CIFAR10 if self.dataset == "cifar10" else CIFAR100
        root = Path(self.root or "data")
        try:
            return cls(str(root), train=train, download=self.download)
        except RuntimeError as e:
            raise FileNotFoundError(
                f"{self.dataset} not found under {root} ({e}); set --data.download=true (needs network) or "
                f"unpack {cls.base_folder} into --data.root"
            ) from None

    def _folder(self) -> dict[str, tuple[Any, list[int] | None]]:
        root = Path(self.root)  # type: ignore[arg-type]
        if not root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root} (--data.root)")
        # ImageNet layout root/{train,val[,test]}/<class>/..., else root/<class>/... split by val_fraction.
        names = [s for s in ("train", "val", "test") if (root / s).is_dir()] if (root / "train").is_dir() else []
        trees = {s: list_image_folder(root / s) for s in names} or {"train": list_image_folder(root)}
        self.class_names = trees["train"][1]
        self.num_classes = len(self.class_names)
        for split, (_, classes) in trees.items():
            if classes != self.class_names:
                raise ValueError(f"{root / split} has classes {classes}, but train has {self.class_names}")
        return {
            s: (ImageFiles(files, self.on_bad_image), [label for _, label in files]) for s, (files, _) in trees.items()
        }

    def _huggingface(self) -> dict[str, tuple[Any, list[int] | None]]:
        import datasets

        root = self.root or ""
        local = Path(root)
        try:
            if local.is_dir() and any(local.rglob("*.parquet")):
                ds = datasets.load_dataset("parquet", data_dir=str(local))
            elif local.is_dir():
                ds = datasets.load_dataset("imagefolder", data_dir=str(local))
            else:
                ds = datasets.load_dataset(root)
        except ConnectionError as e:
            raise ConnectionError(
                f"could not load the Hugging Face dataset {root!r} ({e}); offline, point --data.root at a local "
                f"imagefolder or parquet directory"
            ) from None
        except FileNotFoundError as e:
            raise FileNotFoundError(f"Hugging Face dataset {root!r} not found: {e}") from None
        aliases = {"train": ("train",), "val": ("validation", "val", "valid"), "test": ("test",)}
        found = {ours: next((s for s in names if s in ds), None) for ours, names in aliases.items()}
        if found["train"] is None:
            raise ValueError(f"Hugging Face dataset {root!r} has no train split (splits: {list(ds)})")
        features = ds[found["train"]].features
        image_col = self.image_column or next((c for c in ("image", "img") if c in features), None)
        label_col = self.label_column or next((c for c in ("label", "labels", "fine_label") if c in features), None)
        if image_col not in features or label_col not in features:
            raise ValueError(
                f"Hugging Face dataset {root!r} has columns {list(features)}; set --data.image_column and "
                f"--data.label_column (got {image_col!r}, {label_col!r})"
            )
        label_feature = features[label_col]
        if hasattr(label_feature, "names"):
            self.class_names = list(label_feature.names)
        else:
            self.class_names = [str(i) for i in range(int(max(ds[found["train"]][label_col])) + 1)]
        self.num_classes = len(self.class_names)
        return {
            ours: (HFImages(ds[split], image_col, label_col), list(ds[split][label_col]))
            for ours, split in found.items()
            if split is not None
        }

    # ---- loaders ----------------------------------------------------------------------------------------------
    def _loader_kwargs(self) -> dict[str, Any]:
        return {
            "num_workers": self.num_workers,
            "pin_memory": torch.cuda.is_available(),
            "persistent_workers": self.num_workers > 0,
        }

    def train_dataloader(self) -> DataLoader:
        data = self.splits["train"]
        world = self.trainer.world_size if self.trainer is not None else 1
        if len(data) < self.batch_size * world:
            raise ValueError(
                f"the train split of {self._describe()} has {len(data)} images, fewer than one batch "
                f"({self.batch_size} x {world} processes); lower --data.batch_size to at most {len(data) // world}"
            )
        return ResumableLoader(data, self.batch_size, shuffle=True, seed=self.seed, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        return eval_loader(self.splits["val"], self.eval_batch_size, **self._loader_kwargs())

    def test_dataloader(self) -> DataLoader:
        return eval_loader(self.splits["test"], self.eval_batch_size, **self._loader_kwargs())

    def info(self) -> DataInfo:
        """Classes (known after setup for folders and datasets), the image size and channels the model is built
        for, the normalisation (kept in checkpoints for `polyformer classify`) and its inverse, for media."""
        names = None if self.class_names is None else tuple(self.class_names)
        return DataInfo(
            num_classes=self.num_classes, class_names=names, image_size=self.image_size, channels=self.channels,
            mean=self.mean, std=self.std, denormalize=self.denormalize,
        )  # fmt: skip

    def denormalize(self, images: Tensor) -> Tensor:
        """Model inputs (B, C, H, W) back to uint8 pixels, for callbacks that log images."""
        mean = torch.tensor(self.mean, device=images.device)[:, None, None]
        std = torch.tensor(self.std, device=images.device)[:, None, None]
        return ((images.float() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)


def stratified_split(labels: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (keep, held out) with `fraction` of every class held out (at least one where a class has two)."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(i)
    keep, held = [], []
    for members in by_class.values():
        members = list(rng.permutation(members))
        n = min(len(members) - 1, max(1, round(fraction * len(members)))) if len(members) > 1 else 0
        held += members[:n]
        keep += members[n:]
    return sorted(keep), sorted(held)
