"""Masked-LM data: BERT's masking statistics (15% selected; of those 80% [MASK], 10% random, 10% kept) over many
tokens, special tokens never selected, labels only at the selected positions, whole words kept whole, masks fixed by
the sample seed (so resume is exact) and on validation by the index; the data module over the built-in corpus."""

import torch

from polyformer.data.loading import SeededSamples, sample_seed
from polyformer.data.masked_text import IGNORE, MaskedTextDataModule, mask_tokens
from polyformer.data.tokenizers import BERT_SPECIALS, train_bpe, with_special_tokens, word_starts


def test_masking_statistics_and_labels():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(10, 1000, (200_000,), generator=g)
    maskable = torch.rand(len(tokens), generator=g) > 0.1  # every 10th-ish token a special one
    random_ids = torch.arange(10, 1000)
    inputs, labels = mask_tokens(tokens, maskable, 0.15, mask_id=3, random_ids=random_ids, generator=g)
    selected = labels != IGNORE
    assert not selected[~maskable].any()  # special tokens are never selected
    assert torch.equal(labels[selected], tokens[selected])  # the label is the original token
    assert torch.equal(inputs[~selected], tokens[~selected])  # nothing else changes
    share = selected.sum() / maskable.sum()
    assert abs(share - 0.15) < 0.005, share
    masked = (inputs[selected] == 3).float().mean()
    kept = (inputs[selected] == tokens[selected]).float().mean()  # includes random draws of the same token (~0.1%)
    changed = 1 - masked - kept
    assert abs(masked - 0.8) < 0.01 and abs(kept - 0.1) < 0.01 and abs(changed - 0.1) < 0.01, (masked, kept)
    assert ((inputs[selected] >= 10) | (inputs[selected] == 3)).all()  # random replacements are never specials


def test_whole_word_masking_keeps_words_whole():
    g = torch.Generator().manual_seed(1)
    T = 50_000
    starts = torch.rand(T, generator=g) < 0.4  # words of ~2.5 pieces
    maskable = torch.ones(T, dtype=torch.bool)
    maskable[::97] = False
    tokens = torch.randint(10, 500, (T,), generator=g)
    _, labels = mask_tokens(tokens, maskable, 0.15, 3, torch.arange(10, 500), starts, generator=g)
    selected = labels != IGNORE
    begins = starts | ~maskable
    begins[1:] |= ~maskable[:-1]
    begins[0] = True
    word = begins.long().cumsum(0) - 1
    for w in torch.unique(word[selected]).tolist():  # a selected word is selected in all its maskable pieces
        members = (word == w) & maskable
        assert selected[members].all()
    assert not selected[~maskable].any()
    assert abs(selected.sum() / maskable.sum() - 0.15) < 0.01


def test_word_starts_of_byte_level_bpe():
    tok = with_special_tokens(train_bpe(["the tokenizer tokenizes words into pieces"] * 20, 300), BERT_SPECIALS)
    starts = word_starts(tok)
    ids = tok.encode(" tokenization pieces")
    assert starts[ids[0]] and not all(starts[i] for i in ids)  # " tokeniz" + continuation pieces
    assert all(starts[i] for i in tok.special_ids)
    assert with_special_tokens(tok, BERT_SPECIALS).vocab_size == tok.vocab_size  # already there: unchanged


def test_data_module_masks_per_sample_seed(tmp_path):
    dm = MaskedTextDataModule(block_size=32, batch_size=4, bpe_vocab_size=400, cache_dir=str(tmp_path))
    dm.setup()
    tok = dm.tokenizer
    vocab = tok.inner.get_vocab(with_added_tokens=True)
    cls_id, sep_id, mask_id = (vocab[n] for n in BERT_SPECIALS)
    assert dm.info().vocab_size == tok.vocab_size and mask_id in tok.special_ids
    inputs, labels = dm.val_set[0]
    assert inputs.shape == labels.shape == (32,) and inputs[0] == cls_id and inputs[-1] == sep_id
    assert labels[0] == IGNORE and labels[-1] == IGNORE
    assert all(torch.equal(a, b) for a, b in zip(dm.val_set[0], dm.val_set[0]))  # validation: fixed masks
    train = SeededSamples(dm.train_set)
    key = (5, sample_seed(0, 0, 5))
    first, again = train[key], train[key]
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # the same sample seed, the same masks
    other = train[(5, sample_seed(0, 1, 5))]  # next epoch: the same block, other masks
    assert not torch.equal(first[1], other[1])
    loader = dm.train_dataloader()
    x, y = next(iter(loader))
    assert x.shape == y.shape == (4, 32) and (y != IGNORE).any()
