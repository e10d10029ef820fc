"""Image-caption data: built-in digits with generated captions, tokenization, a local folder with a captions file,
webdataset shards through `datasets`, and clear errors for bad sources."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from polyformer.data.digits import DIGIT_NAMES, load_digits_split
from polyformer.data.image_text import DIGIT_TEMPLATES, ImageTextData, tokenize
from polyformer.data.tokenizers import byte_level


def test_digits_pairs_every_train_image_with_every_template_and_hold_out_test():
    data = ImageTextData(batch_size=16, context_length=32)
    data.setup("fit")
    train, test = data.datasets["train"], data.datasets["test"]
    n_train = len(load_digits_split("train")[1])
    assert len(train) == n_train * len(DIGIT_TEMPLATES) and len(test) == len(load_digits_split("test")[1])
    first = train.captions[: len(DIGIT_TEMPLATES)]  # image 0 with each template
    label = int(train.labels[0])
    assert first[0] == f"a photo of the number {DIGIT_NAMES[label]}" and first[1] == f"handwritten {label}"
    # Captions name the digit of their image.
    for i in range(0, len(test), 37):
        item, caption = test[i], test.captions[i]
        assert DIGIT_NAMES[int(item["label"])] in caption or str(int(item["label"])) in caption
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (16, 1, 8, 8) and batch["image"].dtype == torch.float32
    assert batch["text"].shape == (16, 32) and batch["label"].shape == (16,)
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0  # (x / 255 - 0.5) / 0.5
    assert data.class_names == DIGIT_NAMES and data.vocab_size == data.tokenizer.vocab_size
    assert sorted(data.datasets["val"].labels.unique().tolist()) == list(range(10))


def test_tokenize_wraps_in_bos_eos_and_pads_with_zero():
    tok = byte_level()
    tokens = tokenize(tok, ["hi", "hello world"], 8)
    assert tokens[0].tolist() == [tok.bos_id, ord("h"), ord("i"), tok.eos_id, 0, 0, 0, 0]
    assert tokens[1, -1] == tok.eos_id and tokens[1, :7].tolist() == [tok.bos_id, *map(ord, "hello ")]


def _save_png(path, value: int, size: int = 12) -> None:
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_local_folder_with_captions_file(tmp_path, fmt):
    rows = [{"image": f"img{i}.png", "caption": f"a square of grey {i}", "label": i % 2} for i in range(10)]
    for i, row in enumerate(rows):
        _save_png(tmp_path / row["image"], 20 * i)
    if fmt == "jsonl":
        (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        kwargs = {}
    else:
        lines = ["image,caption,label", *(f"{r['image']},{r['caption']},{r['label']}" for r in rows)]
        (tmp_path / "pairs.csv").write_text("\n".join(lines))
        kwargs = {"captions": str(tmp_path / "pairs.csv")}
    data = ImageTextData(
        source=str(tmp_path), label_column="label", class_names=["dark", "light"], image_size=8, batch_size=4,
        val_fraction=0.2, **kwargs,
    )  # fmt: skip
    data.setup("fit")
    assert len(data.datasets["train"]) == 8 and len(data.datasets["val"]) == 2
    batch = next(iter(data.val_dataloader()))
    assert batch["image"].shape == (2, 3, 8, 8) and set(batch["label"].tolist()) <= {0, 1}
    decoded = data.tokenizer.decode(batch["text"][0].tolist())
    assert decoded.startswith("a square of grey")


def test_webdataset_shards_read_through_datasets(tmp_path):
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(6):
            buf = io.BytesIO()
            Image.fromarray(np.full((10, 10, 3), 40 * i, dtype=np.uint8)).save(buf, format="PNG")
            for name, payload in ((f"{i:04d}.png", buf.getvalue()), (f"{i:04d}.txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    data = ImageTextData(source=str(shard), image_size=8, batch_size=2, val_fraction=0.3)
    data.setup("fit")
    assert len(data.datasets["train"]) + len(data.datasets["val"]) == 6
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (2, 3, 8, 8)
    assert data.tokenizer.decode(batch["text"][0].tolist()).startswith("caption ")


def test_bad_sources_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="captions file not found"):
        ImageTextData(source=str(tmp_path)).setup("fit")
    with pytest.raises(ConnectionError, match="no-such-user/no-such-captions"):
        ImageTextData(source="no-such-user/no-such-captions").setup("fit")
    with pytest.raises(ValueError, match="val_fraction"):
        ImageTextData(val_fraction=1.5)
    (tmp_path / "captions.jsonl").write_text(json.dumps({"file": "a.png", "alt": "x"}))
    with pytest.raises(ValueError, match="caption column"):
        ImageTextData(source=str(tmp_path)).setup("fit")
