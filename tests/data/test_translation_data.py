"""Translation data: local file formats, the built-in corpus, length-bucketed batches (sharded, resumable)."""

import json
import random

import pytest
import torch

import polyformer.data.translation as translation
from polyformer.data.translation import BucketBatchSampler, TranslationData, carve_missing_splits, read_local

PAIRS = [("one", "un"), ("two hundred", "deux cents"), ("three thousand and four", "trois mille quatre")] * 4


def write_prefix(tmp_path, name="train"):
    (tmp_path / f"{name}.en").write_text("\n".join(s for s, _ in PAIRS) + "\n", encoding="utf-8")
    (tmp_path / f"{name}.fr").write_text("\n".join(t for _, t in PAIRS) + "\n", encoding="utf-8")
    return str(tmp_path / name)


def test_local_formats_read_the_same_pairs(tmp_path):
    jsonl, jsonl_tr, tsv = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.tsv"
    jsonl.write_text("\n".join(json.dumps({"en": s, "fr": t}) for s, t in PAIRS))
    jsonl_tr.write_text("\n".join(json.dumps({"translation": {"en": s, "fr": t}}) for s, t in PAIRS))
    tsv.write_text("\n".join(f"{s}\t{t}" for s, t in PAIRS))
    expected = ([s for s, _ in PAIRS], [t for _, t in PAIRS])
    for path in (write_prefix(tmp_path), str(jsonl), str(jsonl_tr), str(tsv)):
        assert read_local(path, "en", "fr") == expected


def test_bad_local_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.en"):
        read_local(str(tmp_path / "missing"), "en", "fr")
    prefix = write_prefix(tmp_path)
    (tmp_path / "train.fr").write_text("un\n")
    with pytest.raises(ValueError, match="must be aligned"):
        read_local(prefix, "en", "fr")
    bad = tmp_path / "x.jsonl"
    bad.write_text(json.dumps({"src": "a", "tgt": "b"}))
    with pytest.raises(ValueError, match="'en' and 'fr'"):
        read_local(str(bad), "en", "fr")
    with pytest.raises(ValueError, match="max_tokens"):
        TranslationData(max_tokens=10, max_length=64)


def test_hub_name_offline_fails_clearly():
    dm = TranslationData(dataset="no-such-user/no-such-dataset", subset="de-en")
    with pytest.raises(ConnectionError, match="no-such-user/no-such-dataset"):
        dm.setup("fit")


def test_local_data_module_batches(tmp_path):
    dm = TranslationData(train_path=write_prefix(tmp_path), bpe_vocab_size=300, batch_size=4, held_out_fraction=0.2)
    dm.setup("fit")
    assert set(dm.datasets) == {"train", "validation", "test"}  # carved from train when not given
    assert sum(len(d) for d in dm.datasets.values()) == len(PAIRS)
    batch = next(iter(dm.train_dataloader()))
    tok = dm.tokenizer
    assert (batch["target_in"][:, 0] == tok.bos_id).all()
    # target_out is target_in shifted by one, with eos where the real tokens end
    real = batch["target_out"] != tok.pad_id
    assert torch.equal(batch["target_out"][:, :-1][real[:, 1:]], batch["target_in"][:, 1:][real[:, 1:]])
    assert (batch["target_out"].gather(1, real.sum(1, keepdim=True) - 1) == tok.eos_id).all()
    assert sorted(tok.decode(row[row != tok.pad_id][1:].tolist()) for row in batch["target_in"]) == sorted(
        batch["references"]
    )


def test_separate_vocabularies(tmp_path):
    dm = TranslationData(train_path=write_prefix(tmp_path), bpe_vocab_size=300, shared_vocab=False)
    dm.setup("fit")
    assert dm.tokenizer.to_json() != dm.source_tokenizer.to_json()
    # each side's BPE learned its own language's words
    assert len(dm.tokenizer.encode("deux cents")) < len(dm.source_tokenizer.encode("deux cents"))
    assert len(dm.source_tokenizer.encode("two hundred")) < len(dm.tokenizer.encode("two hundred"))


def test_numbers_module_and_bad_language():
    dm = TranslationData(target_lang="es", bpe_vocab_size=400, train_size=300, val_size=20, test_size=20)
    dm.setup("fit")
    assert [len(dm.datasets[s]) for s in ("train", "validation", "test")] == [300, 20, 20]
    assert dm.vocab_size == dm.source_vocab_size == dm.tokenizer.vocab_size
    with pytest.raises(ValueError, match="target_lang='it'"):
        TranslationData(target_lang="it", train_size=10).setup("fit")


def test_carving_is_seeded_and_disjoint():
    src = [str(i) for i in range(100)]
    a = carve_missing_splits({"train": (src, src)}, 0.1, seed=1)
    assert a == carve_missing_splits({"train": (src, src)}, 0.1, seed=1)
    assert [len(a[s][0]) for s in ("train", "validation", "test")] == [80, 10, 10]
    assert len(set(a["train"][0]) | set(a["validation"][0]) | set(a["test"][0])) == 100


_rng = random.Random(0)
LENGTHS = [_rng.randint(1, 40) for _ in range(500)]


def padding_fraction(batches, lengths):
    return 1 - sum(lengths[i] for b in batches for i in b) / sum(len(b) * max(lengths[i] for i in b) for b in batches)


def test_buckets_cover_every_sample_once_with_little_padding():
    sampler = BucketBatchSampler(LENGTHS, batch_size=16, max_tokens=None)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(500))
    assert len(batches) == len(sampler) == 32
    rng = random.Random(0)
    order = list(range(500))
    rng.shuffle(order)
    unsorted = [order[i : i + 16] for i in range(0, 500, 16)]
    assert padding_fraction(batches, LENGTHS) < 0.05 < padding_fraction(unsorted, LENGTHS)
    sampler.epoch = 1
    assert list(sampler) != batches  # a new order every epoch


def test_max_tokens_caps_padded_tokens():
    sampler = BucketBatchSampler(LENGTHS, batch_size=10_000, max_tokens=200)
    batches = list(sampler)
    assert all(len(b) * max(LENGTHS[i] for i in b) <= 200 for b in batches)
    assert sorted(i for b in batches for i in b) == list(range(500))
    assert len(batches) == len(sampler)


def test_ranks_get_disjoint_shards_of_equal_length(monkeypatch):
    shards = []
    for rank in (0, 1):
        monkeypatch.setattr(translation, "world_and_rank", lambda rank=rank: (2, rank))
        sampler = BucketBatchSampler(LENGTHS, batch_size=10_000, max_tokens=230)
        shards.append(list(sampler))
        assert len(shards[-1]) == len(sampler)
    assert len(shards[0]) == len(shards[1])
    assert not {i for b in shards[0] for i in b} & {i for b in shards[1] for i in b}


def test_loader_resumes_mid_epoch(tmp_path):
    dm = TranslationData(bpe_vocab_size=400, train_size=200, val_size=10, test_size=10, batch_size=16)
    dm.setup("fit")
    loader = dm.train_dataloader()
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    rest = [b["index"].tolist() for b in it]
    fresh = dm.train_dataloader()
    fresh.load_state_dict(state)
    assert [b["index"].tolist() for b in fresh] == rest
    # a finished epoch moves on to the next only when iterated again (Lightning stops after len() batches)
    assert fresh.state_dict() == {"epoch": 0, "batches_done": len(fresh)}
    next(iter(fresh))
    assert fresh.state_dict() == {"epoch": 1, "batches_done": 1}


def test_hub_layout_dataset_from_a_local_folder(tmp_path):
    # The same code path as a hub name (datasets.load_dataset), on a folder in the WMT/OPUS row layout.
    folder = tmp_path / "opus_like"
    folder.mkdir()
    rows = "\n".join(json.dumps({"translation": {"en": s, "fr": t}}) for s, t in PAIRS)
    for split in ("train", "validation", "test"):
        (folder / f"{split}.jsonl").write_text(rows)
    dm = TranslationData(dataset=str(folder), bpe_vocab_size=300, batch_size=4)
    dm.setup("fit")
    assert [len(dm.datasets[s]) for s in ("train", "validation", "test")] == [len(PAIRS)] * 3
    assert dm.datasets["test"].references == [t for _, t in PAIRS]
    with pytest.raises(ValueError, match="not 'en' and 'de'"):
        TranslationData(dataset=str(folder), target_lang="de").setup("fit")
