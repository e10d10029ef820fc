"""Regression tests for data and decoding defects: CLIP's start token, validation sets that were the training set,
an LM checkpoint accepted with another tokenizer, max_tokens batches above batch_size, unchecked sampling settings."""

import gzip
import json
from pydoc_data.topics import topics

import lightning as L
import pytest
import torch
from data.test_text_data import split_texts

from polyformer.backbone import TransformerConfig
from polyformer.checkpointing.loading import load_task
from polyformer.data.image_text import tokenize
from polyformer.data.text import TextDataModule, is_validation
from polyformer.data.tokenizers import Tokenizer, pretrained, train_bpe
from polyformer.data.translation import BucketBatchSampler, length_batches
from polyformer.decoding import Decoder, sample
from polyformer.tasks.language_model import LanguageModel, SamplingConfig

CAPTIONS = ["a photo of a cat", "Handwritten 7!", "the digit seven, twice: 7 7", "An image of a dog on a sofa"]

# ---- 1. CLIP tokenizers: <|startoftext|> / <start_of_text> is bos ---------------------------------------------------


@pytest.fixture(scope="module")
def clip_bpe_files(tmp_path_factory):
    """vocab.json + merges.txt of OpenAI CLIP's BPE, built from the copy that ships inside open_clip (no network)."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    # open_clip's own construction (SimpleTokenizer.__init__): bytes, bytes + </w>, merges, then the two specials.
    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    base = list(bytes_to_unicode().values())
    vocab = [*base, *(v + "</w>" for v in base), *("".join(m.split()) for m in merges)]
    folder = tmp_path_factory.mktemp("clip-bpe")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder, vocab


@pytest.mark.parametrize(
    "bos, eos",
    [("<|startoftext|>", "<|endoftext|>"), ("<start_of_text>", "<end_of_text>")],  # OpenAI / HF, and open_clip's
    ids=["openai", "open_clip"],
)
def test_clip_tokenizer_captions_match_open_clip_and_transformers(clip_bpe_files, tmp_path, bos, eos):
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizerFast

    folder, vocab = clip_bpe_files
    (tmp_path / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate([*vocab, bos, eos])}))
    hf = CLIPTokenizerFast(
        str(tmp_path / "vocab.json"), str(folder / "merges.txt"), bos_token=bos, eos_token=eos, unk_token=eos,
        pad_token=eos,
    )  # fmt: skip
    hf.save_pretrained(tmp_path / "clip")  # writes tokenizer.json, the file our loader reads
    ours = pretrained(str(tmp_path / "clip"))
    assert (ours.bos_id, ours.eos_id) == (49406, 49407)
    context = 16
    expected = SimpleTokenizer()(CAPTIONS, context_length=context)  # open_clip: [sot] text [eot] 0 ...
    got = tokenize(ours, CAPTIONS, context)
    assert got[:, 0].tolist() == [49406] * len(CAPTIONS)
    assert torch.equal(got, expected)
    for caption, row in zip(CAPTIONS, got.tolist()):
        assert row[: row.index(49407) + 1] == hf(caption).input_ids  # transformers' ids, specials included


# ---- 2. local text with val_split: validation was the training set ----------------------------------------------


def write_docs(path, docs):
    path.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    return str(path)


def test_local_text_with_val_split_never_validates_on_training_data(tmp_path):
    train = write_docs(tmp_path / "train.jsonl", [f"training document {i} " * 8 for i in range(60)])
    with pytest.raises(ValueError, match=r"data\.val_split.*data\.val_source"):
        TextDataModule(source=train, val_split="validation", tokenizer="byte", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"data\.val_split.*built-in"):
        TextDataModule(val_split="validation", tokenizer="byte", cache_dir=str(tmp_path))


def test_val_source_files_are_the_validation_set(tmp_path):
    train_docs = [f"training document {i} about topic {i % 5} " * 6 for i in range(120)]
    val_docs = [f"held-out validation text {i} " * 6 for i in range(30)]
    train = write_docs(tmp_path / "train.jsonl", train_docs)
    val = write_docs(tmp_path / "valid.jsonl", val_docs)
    dm = TextDataModule(source=train, val_source=val, tokenizer="bpe", bpe_vocab_size=300, block_size=16,
                        batch_size=2, cache_dir=str(tmp_path / "cache"))  # fmt: skip
    dm.setup("fit")
    assert any(is_validation(d, 0.05) for d in train_docs)
    assert sorted(split_texts(dm, "train")) == sorted(train_docs)  # every training document trains: no hash hold-out
    assert sorted(split_texts(dm, "val")) == sorted(val_docs)
    other = write_docs(tmp_path / "other.jsonl", val_docs[:20])  # another validation set: another cache
    again = TextDataModule(source=train, val_source=other, tokenizer="byte", block_size=16, batch_size=2,
                           cache_dir=str(tmp_path / "cache"))  # fmt: skip
    assert again._corpus_key() != dm._corpus_key()
    with pytest.raises(ValueError, match=r"data\.val_split .* and data\.val_source .* set only one"):
        TextDataModule(source=train, val_source=val, val_split="validation", cache_dir=str(tmp_path))


def test_streaming_validation_reads_val_source(tmp_path):
    train_docs = [f"streamed training document {i} " * 10 for i in range(100)]
    val_docs = [f"held-out validation text {i} " * 10 for i in range(7)]
    hashed_out = [d for d in train_docs if is_validation(d, 0.05)]
    assert hashed_out  # documents the hash split would have held out of training
    train = write_docs(tmp_path / "train.jsonl", train_docs)
    val = write_docs(tmp_path / "valid.jsonl", val_docs)
    dm = TextDataModule(source=train, val_source=val, streaming=True, tokenizer="byte", block_size=32, batch_size=1,
                        cache_dir=str(tmp_path / "cache"))  # fmt: skip
    dm.setup("fit")
    assert dm.val_set.num_tokens == sum(len(d.encode()) + 1 for d in val_docs)
    stream = dm.tokenizer.decode([t for b in dm.train_dataloader() for t in b[0, :-1].tolist()])
    assert all(d in stream for d in hashed_out)  # validation has its own files: training keeps every document


# ---- 3. LM checkpoint with another tokenizer of the same size ------------------------------------------------------

TINY = TransformerConfig(width=32, depth=1, heads=4, position="learned", max_len=32, causal=True, dropout=0.0)


def text_data(tmp_path, tokenizer: Tokenizer, name: str) -> TextDataModule:
    tokenizer.save(tmp_path / name / "tokenizer.json")
    docs = [f"{topics[k][:400]}" for k in sorted(topics)[:40]]
    source = write_docs(tmp_path / "docs.jsonl", docs)
    dm = TextDataModule(source=source, tokenizer=str(tmp_path / name), val_fraction=0.3, block_size=16, batch_size=2,
                        cache_dir=str(tmp_path / "cache"))  # fmt: skip
    dm.setup("fit")
    return dm


def quiet_trainer(tmp_path, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path, **kwargs)  # fmt: skip


@pytest.fixture(scope="module")
def two_tokenizers():
    a = train_bpe([topics[k] for k in sorted(topics)[:30]], vocab_size=300)
    b = train_bpe([topics[k] for k in sorted(topics)[-30:]], vocab_size=300)
    assert a.vocab_size == b.vocab_size == 300 and a.to_json() != b.to_json()
    return a, b


@pytest.fixture
def lm_checkpoint(tmp_path, two_tokenizers):
    data_a = text_data(tmp_path, two_tokenizers[0], "a")
    model = LanguageModel(backbone=TINY)
    t = quiet_trainer(tmp_path, max_steps=1, limit_val_batches=1)
    t.fit(model, datamodule=data_a)
    t.save_checkpoint(tmp_path / "lm.ckpt")
    return tmp_path / "lm.ckpt", data_a


def test_lm_checkpoint_with_another_tokenizer_of_the_same_size_is_refused(tmp_path, two_tokenizers, lm_checkpoint):
    ckpt, data_a = lm_checkpoint
    data_b = text_data(tmp_path, two_tokenizers[1], "b")
    # `validate/test/fit --ckpt_path`: the checkpoint is restored after setup, with the data module's tokenizer.
    for verb in ("validate", "fit"):
        with pytest.raises(ValueError, match=r"same vocab_size \(300\).*token id \d+ is .* the data module"):
            getattr(quiet_trainer(tmp_path, max_steps=2), verb)(LanguageModel(backbone=TINY), datamodule=data_b,
                                                                ckpt_path=ckpt)  # fmt: skip
    # A task loaded from the checkpoint (as `generate` does), then given a data module: setup compares.
    with pytest.raises(ValueError, match=r"same vocab_size \(300\).*data\.tokenizer"):
        quiet_trainer(tmp_path).validate(load_task(ckpt, expected=LanguageModel), datamodule=data_b)
    # The same tokenizer is still accepted on both paths.
    quiet_trainer(tmp_path, limit_val_batches=1).validate(LanguageModel(backbone=TINY), datamodule=data_a,
                                                          ckpt_path=ckpt, verbose=False)  # fmt: skip
    quiet_trainer(tmp_path, limit_val_batches=1).validate(load_task(ckpt, expected=LanguageModel), datamodule=data_a,
                                                          verbose=False)  # fmt: skip


# ---- 4. max_tokens batches are capped at batch_size -----------------------------------------------------------------


def test_max_tokens_batches_never_exceed_batch_size():
    lengths = [3] * 100  # short pairs: max_tokens alone would put 33 of them in one batch
    batches = length_batches(lengths, list(range(100)), batch_size=8, max_tokens=100)
    assert max(map(len, batches)) == 8 and sorted(i for b in batches for i in b) == list(range(100))
    long = [30] * 10  # long pairs: max_tokens is the tighter limit
    assert max(map(len, length_batches(long, list(range(10)), batch_size=8, max_tokens=100))) == 3
    sampler = BucketBatchSampler(lengths, batch_size=8, max_tokens=100)
    assert all(len(b) <= 8 for b in sampler) and len(list(sampler)) == len(sampler) == 13


# ---- 5. sampling settings are validated --------------------------------------------------------------------------

BAD_SAMPLING = [
    ("top_p", 0.0, r"top_p"),
    ("top_p", 1.5, r"top_p"),
    ("top_p", float("nan"), r"top_p"),
    ("top_k", 0, r"top_k"),
    ("top_k", -3, r"top_k"),
    ("temperature", -0.5, r"temperature"),
    ("max_new_tokens", -1, r"max_new_tokens"),
]


@pytest.mark.parametrize("name, value, field", BAD_SAMPLING)
def test_sampling_config_rejects_bad_values(name, value, field):
    with pytest.raises(ValueError, match=rf"model\.samples\.{field} must be .*(>= |in \(0, 1\]).*got {value}"):
        SamplingConfig(**{name: value})


def test_sampling_config_accepts_the_edges():
    SamplingConfig(temperature=0.0, top_k=1, top_p=1.0, max_new_tokens=0)
    SamplingConfig(top_k=None, top_p=None)
    SamplingConfig(top_p=1e-6)


@pytest.mark.parametrize("name, value, field", BAD_SAMPLING)
def test_sample_rejects_bad_values(name, value, field):
    vocab = 7

    def forward(tokens, mask, positions, cache):
        return torch.zeros(tokens.shape[0], tokens.shape[1], vocab)

    kwargs = {"max_new_tokens": 3, "temperature": 1.0, "top_k": None, "top_p": None, name: value}
    with pytest.raises(ValueError, match=rf"^{field} must be .*(>= |in \(0, 1\]).*got {value}"):
        sample(Decoder(forward, lambda: None, use_cache=False), [[1, 2]], **kwargs)
    good = {**kwargs, name: {"top_p": 1.0, "top_k": 1, "temperature": 0.0, "max_new_tokens": 2}[name]}
    out = sample(Decoder(forward, lambda: None, use_cache=False), [[1, 2]], **good)
    assert len(out) == 1 and all(0 <= t < vocab for t in out[0])
