"""The text data module: held-out split, token files, local sources, streaming, cache reuse and errors."""

import json
import threading

import numpy as np
import pytest
import torch

from polyformer.data.text import TextDataModule, builtin_documents, is_validation


def split_texts(dm: TextDataModule, split: str) -> list[str]:
    """The documents of a split, read back from its token file (documents end with eos)."""
    ds = dm.train_set if split == "train" else dm.val_set
    tokens = np.memmap(ds.path, dtype=ds.dtype, mode="r").tolist()
    docs, current = [], []
    for t in tokens:
        if t == dm.tokenizer.eos_id:
            docs.append(dm.tokenizer.decode(current))
            current = []
        else:
            current.append(t)
    return docs


@pytest.fixture(scope="module")
def builtin(tmp_path_factory) -> TextDataModule:
    dm = TextDataModule(tokenizer="byte", block_size=64, batch_size=4, cache_dir=str(tmp_path_factory.mktemp("cache")))
    dm.setup("fit")
    return dm


def test_validation_text_never_appears_in_training(builtin):
    train, val = split_texts(builtin, "train"), split_texts(builtin, "val")
    docs = [d for d in builtin_documents() if d]
    assert sorted(train + val) == sorted(docs)  # nothing lost, nothing invented: the token files round-trip
    assert 0.02 < sum(map(len, val)) / sum(map(len, docs)) < 0.1  # about val_fraction = 5% of the text
    train_text = "\x00".join(train)
    assert not any(doc in train_text for doc in val)


def test_blocks_are_consecutive_windows(builtin, tmp_path):
    tokens = np.memmap(builtin.train_set.path, dtype=builtin.train_set.dtype, mode="r")
    block = builtin.train_set[3]
    assert block.shape == (65,) and block.dtype == torch.int64
    assert block.tolist() == tokens[3 * 64 : 4 * 64 + 1].tolist()
    assert len(builtin.train_set) == (len(tokens) - 1) // 64
    assert builtin.vocab_size == 258
    batch = next(iter(builtin.train_dataloader()))
    assert batch.shape == (4, 65)
    sequential = TextDataModule(tokenizer="byte", block_size=64, batch_size=4, shuffle=False, cache_dir=str(tmp_path))
    sequential.setup("fit")
    assert torch.equal(next(iter(sequential.train_dataloader()))[1], builtin.train_set[1])


def test_cache_is_reused_and_keyed_by_tokenizer(builtin, tmp_path):
    folder = builtin._token_dir(builtin.tokenizer)
    stamp = (folder / "train.bin").stat().st_mtime_ns
    again = TextDataModule(tokenizer="byte", block_size=32, cache_dir=str(builtin.cache_dir))
    again.setup("fit")
    assert again._token_dir(again.tokenizer) == folder and (folder / "train.bin").stat().st_mtime_ns == stamp
    bpe = TextDataModule(tokenizer="bpe", bpe_vocab_size=512, block_size=32, cache_dir=str(builtin.cache_dir))
    bpe.setup("fit")
    assert bpe._token_dir(bpe.tokenizer) != folder and bpe.vocab_size == 512
    assert (bpe._token_dir(bpe.tokenizer).parent / "bpe-512" / "tokenizer.json").is_file()  # saved with the cache


def test_concurrent_preparation_is_safe(tmp_path):
    """Two data modules preparing the same cache at once (as two runs or two nodes would): one waits for the other."""
    modules = [TextDataModule(tokenizer="bpe", bpe_vocab_size=400, cache_dir=str(tmp_path)) for _ in range(2)]
    errors = []

    def prepare(dm):
        try:
            dm.prepare_data()
        except Exception as e:  # surfaced below: a thread's exception would otherwise vanish
            errors.append(e)

    threads = [threading.Thread(target=prepare, args=(dm,)) for dm in modules]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for dm in modules:
        dm.setup("fit")
    assert modules[0].tokenizer.to_json() == modules[1].tokenizer.to_json()
    assert torch.equal(modules[0].train_set[5], modules[1].train_set[5])
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "parquet"])
def test_local_files_and_globs(tmp_path, fmt):
    docs = [" ".join([f"Document number {i} talks about topic {i % 7} at some length."] * 5) for i in range(300)]
    for part in range(2):
        chunk = docs[part::2]
        path = tmp_path / f"part{part}.{fmt}"
        if fmt == "txt":
            path.write_text("\n\n".join(chunk))  # paragraphs are documents
        elif fmt == "jsonl":
            path.write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(chunk)))
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table({"body": chunk}), path)
    field = "text" if fmt == "txt" else "body"
    dm = TextDataModule(
        source=str(tmp_path / f"*.{fmt}"), text_field=field, tokenizer="byte", block_size=32, cache_dir=str(tmp_path)
    )
    dm.setup("fit")
    train, val = split_texts(dm, "train"), split_texts(dm, "val")
    assert sorted(train + val) == sorted(docs)
    assert set(val) == {d for d in docs if is_validation(d, 0.05)} != set()


def test_streaming_local_files(tmp_path):
    docs = [f"streamed document {i} " * 20 for i in range(400)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    dm = TextDataModule(source=str(tmp_path / "a.jsonl"), streaming=True, tokenizer="byte", block_size=64, batch_size=2)
    dm.cache_dir = tmp_path / "cache"
    dm.setup("fit")
    blocks = [b for _, b in zip(range(30), dm.train_dataloader())]
    assert all(b.shape == (2, 65) for b in blocks)
    stream = dm.tokenizer.decode(torch.cat([b[0, :-1] for b in blocks[:1]]).tolist())
    assert stream.startswith(next(d for d in docs if not is_validation(d, 0.05))[:64])
    held_out = [d for d in docs if is_validation(d, 0.05)]
    assert dm.val_set.num_tokens == sum(len(d.encode()) + 1 for d in held_out)


def test_bad_sources_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no files match"):
        TextDataModule(source=str(tmp_path / "missing*.txt"), cache_dir=str(tmp_path)).setup("fit")
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "x"}))
    with pytest.raises(ValueError, match="text_field 'text' is not a column"):
        TextDataModule(source=str(tmp_path / "a.jsonl"), cache_dir=str(tmp_path)).setup("fit")
    with pytest.raises(ConnectionError, match="needs the network"):  # HF_DATASETS_OFFLINE=1 in conftest
        TextDataModule(source="wikitext", hub_config="wikitext-2-raw-v1", cache_dir=str(tmp_path)).setup("fit")
    with pytest.raises(ValueError, match="val_fraction"):
        TextDataModule(val_fraction=0.0)
    with pytest.raises(ValueError, match="fewer than one block"):
        TextDataModule(tokenizer="byte", block_size=100_000, cache_dir=str(tmp_path)).setup("fit")
