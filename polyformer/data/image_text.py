"""Image-caption pairs for CLIP (Radford et al. 2021): the built-in digits with generated captions, a local folder
of images with a captions file, or a Hugging Face dataset (hub name, local dataset, or webdataset `.tar` shards read
through `datasets`).

Built-in data: scikit-learn's digits (see `polyformer.data.digits`) captioned from templates that name the digit in
words or as a numeral ("a photo of the number seven", "handwritten 7"); every training image is paired with every
template, and zero-shot classification uses prompts that partly differ from the training captions, on held-out
digits. Texts are tokenized to a fixed context: [bos] text [eos] then padding, cut to keep [eos] last, as CLIP does.

Legend: B batch, C channels, H/W image side, T context length.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from polyformer.data.digits import DIGIT_NAMES, load_digits_split
from polyformer.data.info import DataInfo
from polyformer.data.loading import ResumableLoader, eval_loader
from polyformer.data.tokenizers import Tokenizer, byte_level, pretrained

# Training captions of a digit: {name} = "seven", {digit} = "7".
DIGIT_TEMPLATES = (
    "a photo of the number {name}",
    "handwritten {digit}",
    "the digit {name}",
    "a handwritten {name}",
    "an image of a {digit}",
    "number {digit}",
    "a picture of the digit {name}",
    "a scan of the numeral {digit}",
)
# Zero-shot prompts ("{}" = class name, as open_clip's templates); the last two phrasings are never trained on.
DIGIT_PROMPTS = ("a photo of the number {}", "the digit {}", "a blurry drawing of a {}", "{}")
# OpenAI CLIP's image normalisation (open_clip OPENAI_DATASET_MEAN/STD), the default for RGB sources.
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGE_COLUMNS = ("image", "jpg", "png", "jpeg", "webp", "img")
CAPTION_COLUMNS = ("caption", "txt", "text", "captions", "sentences")
Split = Literal["train", "val", "test"]


def tokenize(tokenizer: Tokenizer, texts: list[str], context_length: int) -> Tensor:
    """(B, T) token ids: [bos] text [eos], cut so [eos] stays last, padded with 0.

    Padding is 0 rather than pad_id: the text tower is causal and pools at [eos], so what follows [eos] never
    reaches the embedding, and 0 is a valid id in every vocabulary (pad_id may lie outside a pretrained one).
    """
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2 (bos + eos), got {context_length}")
    out = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, ids in enumerate(tokenizer.encode_batch(list(texts), add_special=True)):
        if len(ids) > context_length:
            ids = [*ids[: context_length - 1], tokenizer.eos_id]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


def normalize(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 (B, C, H, W) in 0..255 -> float, standardised per channel."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (images.float() / 255.0 - m) / s


def load_image(image: Any, image_size: int, channels: int) -> Tensor:
    """A PIL image or a path -> uint8 (C, S, S): shorter side resized to S (bicubic), centre crop, as CLIP does."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF

    if isinstance(image, (str, Path)):
        if not Path(image).is_file():
            raise FileNotFoundError(f"image file not found: {image}")
        image = Image.open(image)
    image = image.convert("L" if channels == 1 else "RGB")
    x = TF.pil_to_tensor(image)
    x = TF.resize(x, image_size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    return TF.center_crop(x, [image_size, image_size])


class DigitPairs(Dataset):
    """Digits with captions: each image with every template (train), or one template per image (val/test)."""

    def __init__(self, split: Split, tokenizer: Tokenizer, context_length: int, seed: int = 0) -> None:
        images, self.labels = load_digits_split(split, seed)
        self.images = images  # (N, 1, 8, 8) uint8
        n, k = len(self.labels), len(DIGIT_TEMPLATES)
        # train: pair p = image p // k with template p % k; eval: image i with template i % k.
        self.index = torch.arange(n * k) // k if split == "train" else torch.arange(n)
        template = torch.arange(n * k) % k if split == "train" else torch.arange(n) % k
        captions = [
            DIGIT_TEMPLATES[t].format(name=DIGIT_NAMES[int(self.labels[i])], digit=int(self.labels[i]))
            for i, t in zip(self.index.tolist(), template.tolist())
        ]
        self.captions = captions
        self.tokens = tokenize(tokenizer, captions, context_length)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        j = int(self.index[i])
        return {"image": self.images[j], "text": self.tokens[i], "label": self.labels[j]}


class CaptionedImages(Dataset):
    """Rows of (image, caption[, label]) from a local captions file or a `datasets` table; images decoded here,
    i.e. in the loader's workers. A row holding several captions gives a random one (train) or the first (eval)."""

    def __init__(
        self,
        rows: Any,
        image_column: str,
        caption_column: str,
        label_column: str | None,
        tokenizer: Tokenizer,
        context_length: int,
        image_size: int,
        channels: int,
        root: Path | None = None,
        train: bool = False,
    ) -> None:
        self.rows, self.root, self.train = rows, root, train
        self.image_column, self.caption_column, self.label_column = image_column, caption_column, label_column
        self.tokenizer, self.context_length = tokenizer, context_length
        self.image_size, self.channels = image_size, channels

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        row = self.rows[i]
        image = row[self.image_column]
        if self.root is not None:
            image = self.root / image
        caption = row[self.caption_column]
        if isinstance(caption, (list, tuple)):
            caption = caption[int(torch.randint(len(caption), ())) if self.train else 0]
        label = row.get(self.label_column, -1) if self.label_column else -1
        return {
            "image": load_image(image, self.image_size, self.channels),
            "text": tokenize(self.tokenizer, [str(caption)], self.context_length)[0],
            "label": torch.tensor(int(label) if label is not None else -1),
        }


def _read_captions_file(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"captions file not found: {path}; give --data.captions (a .jsonl or .csv file)")
    if path.suffix == ".jsonl":
        with path.open() as f:
            return [json.loads(line) for line in f if line.strip()]
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            return list(csv.DictReader(f))
    raise ValueError(f"captions file {path} must end in .jsonl or .csv")


def _pick_column(columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str) -> str:
    if wanted in columns:
        return wanted
    found = next((c for c in candidates if c in columns), None)
    if found is None:
        raise ValueError(f"no {what} column {wanted!r} in the data (columns: {columns}); set --data.{what}_column")
    return found


class ImageTextData(L.LightningDataModule):
    """Image-caption pairs; exposes `tokenizer`, `vocab_size`, `eos_id` (linked into the model), `class_names` and
    `prompts` for zero-shot evaluation, and the image preprocessing (`image_size`, `channels`, `mean`, `std`)."""

    def __init__(
        self,
        source: str = "digits",  # "digits" | a folder of images | a hub dataset name | webdataset shards (*.tar)
        captions: str | None = None,  # for a folder: its captions .jsonl/.csv (default: captions.jsonl inside it)
        image_column: str = "image",
        caption_column: str = "caption",
        label_column: str | None = None,  # integer class of each pair, for zero-shot accuracy with class_names
        class_names: list[str] | None = None,
        prompts: list[str] | None = None,  # zero-shot templates, "{}" = class name
        train_split: str = "train",
        val_split: str | None = None,  # None: hold out val_fraction of train
        val_fraction: float = 0.05,
        tokenizer: str = "byte",  # "byte" (needs no training) or a tokenizer.json / folder / hub name
        context_length: int = 32,
        image_size: int = 224,  # resize + centre crop for files and datasets (the digits stay 8x8)
        channels: Literal[1, 3] = 3,
        mean: tuple[float, ...] | None = None,  # None: the source's default (OpenAI CLIP's for RGB)
        std: tuple[float, ...] | None = None,
        batch_size: int = 64,  # per rank
        eval_batch_size: int = 256,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.source, self.context_length, self.seed = source, context_length, seed
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.tokenizer = byte_level() if tokenizer == "byte" else pretrained(tokenizer)
        self.vocab_size, self.eos_id = self.tokenizer.vocab_size, self.tokenizer.eos_id
        if source == "digits":
            self.image_size, self.channels = 8, 1
            self.class_names, self.prompts = list(DIGIT_NAMES), list(prompts or DIGIT_PROMPTS)
            default_mean, default_std = (0.5,), (0.5,)
        else:
            self.image_size, self.channels = image_size, channels
            self.class_names, self.prompts = class_names, list(prompts or ["a photo of a {}."])
            default_mean, default_std = (CLIP_MEAN, CLIP_STD) if channels == 3 else ((0.5,), (0.5,))
        self.mean, self.std = tuple(mean or default_mean), tuple(std or default_std)
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean {self.mean} and std {self.std} need one value per channel ({self.channels})")
        self.datasets: dict[str, Dataset] = {}

    def info(self) -> DataInfo:
        """The tokenizer (chosen at construction), zero-shot classes and prompts, and the image preprocessing."""
        return DataInfo(
            tokenizer=self.tokenizer, vocab_size=self.vocab_size, eos_id=self.eos_id,
            class_names=None if self.class_names is None else tuple(self.class_names), prompts=tuple(self.prompts),
            image_size=self.image_size, channels=self.channels, mean=self.mean, std=self.std,
        )  # fmt: skip

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        if self.source == "digits":
            for split in ("train", "val", "test"):
                self.datasets[split] = DigitPairs(split, self.tokenizer, self.context_length, self.seed)
            return
        self.datasets = self._load_source()

    def _load_source(self) -> dict[str, Dataset]:
        hp = self.hparams
        path = Path(self.source).expanduser()
        root = None
        if path.is_dir() and not (path / "dataset_info.json").exists() and not any(path.glob("*.parquet")):
            captions = Path(hp.captions) if hp.captions else path / "captions.jsonl"
            rows: Any = _read_captions_file(captions)
            root, columns = path, list(rows[0]) if rows else []
            splits = {"train": rows}
        else:
            splits = self._load_hf()
            columns = list(splits["train"].column_names)
        image_col = _pick_column(columns, hp.image_column, IMAGE_COLUMNS + ("file", "path"), "image")
        caption_col = _pick_column(columns, hp.caption_column, CAPTION_COLUMNS, "caption")
        label_col = hp.label_column if hp.label_column in columns else None
        if hp.label_column and label_col is None:
            raise ValueError(f"label_column {hp.label_column!r} is not in the data (columns: {columns})")
        if "val" not in splits:
            splits["train"], splits["val"] = _hold_out(splits["train"], hp.val_fraction, self.seed)
        splits.setdefault("test", splits["val"])

        def make(rows: Any, train: bool) -> CaptionedImages:
            return CaptionedImages(
                rows, image_col, caption_col, label_col, self.tokenizer, self.context_length,
                self.image_size, self.channels, root, train,
            )  # fmt: skip

        return {name: make(rows, name == "train") for name, rows in splits.items()}

    def _load_hf(self) -> dict[str, Any]:
        import datasets

        hp = self.hparams
        try:
            if self.source.endswith(".tar"):  # webdataset shards: a file, or a glob such as shards/{000..009}.tar
                data = datasets.load_dataset("webdataset", data_files={"train": self.source})
            else:
                data = datasets.load_dataset(self.source)
        except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
            raise ConnectionError(
                f"cannot load image-text dataset {self.source!r} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                "a hub name needs the network once, or give a local folder with captions, or *.tar shards"
            ) from None
        if hp.train_split not in data:
            raise ValueError(f"split {hp.train_split!r} not in {self.source!r} (splits: {list(data)}); set train_split")
        splits = {"train": data[hp.train_split]}
        if hp.val_split is not None:
            if hp.val_split not in data:
                raise ValueError(f"split {hp.val_split!r} not in {self.source!r} (splits: {list(data)}); set val_split")
            splits["val"] = data[hp.val_split]
        return splits

    def collate(self, items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
        batch["image"] = normalize(batch["image"], self.mean, self.std)  # (B, C, H, W)
        return batch

    def _kwargs(self) -> dict[str, Any]:
        return {
            "num_workers": self.num_workers,
            "collate_fn": self.collate,
            "persistent_workers": self.num_workers > 0,
            "pin_memory": torch.cuda.is_available(),  # page-locked batches copy to the GPU asynchronously
        }

    def train_dataloader(self) -> DataLoader:
        return ResumableLoader(self.datasets["train"], self.batch_size, shuffle=True, seed=self.seed, **self._kwargs())

    def val_dataloader(self) -> DataLoader:
        return eval_loader(self.datasets["val"], self.eval_batch_size, **self._kwargs())

    def test_dataloader(self) -> DataLoader:
        return eval_loader(self.datasets["test"], self.eval_batch_size, **self._kwargs())


def _hold_out(rows: Any, fraction: float, seed: int) -> tuple[Any, Any]:
    """A seeded split of a list or `datasets.Dataset` into (train, val), val at least one row."""
    n = len(rows)
    if n < 2:
        raise ValueError(f"need at least 2 image-caption pairs to hold out validation data, got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, math.ceil(n * fraction))
    val, train = sorted(order[:n_val]), sorted(order[n_val:])
    if isinstance(rows, list):
        return [rows[i] for i in train], [rows[i] for i in val]
    return rows.select(train), rows.select(val)
