"""Text for masked-language-model pre-training (Devlin et al. 2019, section 3.1 and appendix A.1): the language
model's token blocks (`polyformer.data.text`), each framed as [CLS] tokens [SEP] and masked when it is loaded.

Of the non-special tokens, `mask_probability` (BERT: 15%) are selected; a selected token is replaced by [MASK] 80% of
the time, by a random non-special token 10%, and kept 10%; the loss is on the selected positions only (the labels are
-100 elsewhere). Whole-word masking (BERT's later release) selects whole words instead: a word is a token and the
continuation pieces after it, by the tokenizer's word boundaries (`tokenizers.word_starts`), so a word is either
entirely selected or not at all; the 80/10/10 choice is still made per token, as in BERT's release.

Masks are drawn per sample: training samples from the generators `SeededSamples` seeds with (seed, epoch, index), so a
resumed run masks every block as the uninterrupted one did, with any number of workers; validation samples from a
generator seeded by their index, so every validation sees the same masks.
Legend: T positions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from polyformer.data.info import DataInfo
from polyformer.data.text import TextDataModule, TokenBlocks
from polyformer.data.tokenizers import BERT_SPECIALS, Tokenizer, with_special_tokens, word_starts

IGNORE = -100  # label of a position that is not predicted (cross_entropy's ignore_index)
MASK_SHARE, RANDOM_SHARE = 0.8, 0.1  # of the selected tokens; the remaining 10% are kept as they are


def mask_tokens(
    tokens: Tensor,
    maskable: Tensor,
    probability: float,
    mask_id: int,
    random_ids: Tensor,
    starts: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """(T,) tokens -> (inputs, labels), both (T,). `maskable` (T,) False at special tokens; `starts` (T,) True where
    a word begins (None: every token is its own word); `random_ids` the ids a random replacement draws from."""
    T = tokens.shape[0]
    if starts is None:
        selected = torch.rand(T, generator=generator) < probability
    else:
        # A special token, and whatever follows one, begins a word too: words never span a special token.
        begins = starts | ~maskable
        begins[1:] |= ~maskable[:-1]
        begins[0] = True
        word = begins.long().cumsum(0) - 1  # (T,) index of each position's word
        selected = (torch.rand(int(word[-1]) + 1, generator=generator) < probability)[word]
    selected &= maskable
    action = torch.rand(T, generator=generator)
    replacement = random_ids[torch.randint(len(random_ids), (T,), generator=generator)]
    inputs = tokens.clone()
    inputs[selected & (action < MASK_SHARE)] = mask_id
    randomised = selected & (action >= MASK_SHARE) & (action < MASK_SHARE + RANDOM_SHARE)
    inputs[randomised] = replacement[randomised]
    return inputs, torch.where(selected, tokens, IGNORE)


class MaskedBlocks(Dataset):
    """[CLS] + the block's tokens + [SEP], masked: (inputs, labels), each (block_size,)."""

    def __init__(
        self, blocks: TokenBlocks, tokenizer: Tokenizer, probability: float, whole_word: bool, fixed: bool
    ) -> None:
        self.blocks, self.probability, self.fixed = blocks, probability, fixed
        vocab = tokenizer.inner.get_vocab(with_added_tokens=True)
        self.cls_id, self.sep_id, self.mask_id = (vocab[n] for n in BERT_SPECIALS)
        special = torch.zeros(tokenizer.vocab_size, dtype=torch.bool)
        special[tokenizer.special_ids] = True
        self.special = special
        self.random_ids = (~special).nonzero().flatten()
        self.starts = torch.tensor(word_starts(tokenizer)) if whole_word else None

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        body = self.blocks[index][:-1]  # a TokenBlocks window has one token more than its stride
        tokens = torch.cat([body.new_tensor([self.cls_id]), body, body.new_tensor([self.sep_id])])
        generator = torch.Generator().manual_seed(index) if self.fixed else None  # None: SeededSamples' seeding
        starts = self.starts[tokens] if self.starts is not None else None
        return mask_tokens(
            tokens, ~self.special[tokens], self.probability, self.mask_id, self.random_ids, starts, generator
        )


class MaskedTextDataModule(TextDataModule):
    """`TextDataModule`'s corpus and options (source, tokenizer, block_size, ...), with BERT's specials added to the
    tokenizer and masked-LM batches (inputs, labels), each (B, block_size)."""

    def __init__(self, mask_probability: float = 0.15, whole_word_masking: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.0 < mask_probability < 1.0:
            raise ValueError(f"data.mask_probability must be in (0, 1), got {mask_probability}")
        if self.streaming:
            raise ValueError("data.streaming is not supported for masked-LM pre-training: set it false")
        if self.block_size < 3:
            raise ValueError(f"data.block_size must be >= 3 ([CLS], a token, [SEP]), got {self.block_size}")
        self.mask_probability, self.whole_word_masking = mask_probability, whole_word_masking

    def info(self) -> DataInfo:
        tok = self.tokenizer
        return DataInfo(tokenizer=tok, vocab_size=tok.vocab_size if tok else None, block_size=self.block_size)

    def _get_tokenizer(self) -> Tokenizer:
        # The language model's tokenizer (the same BPE file for the same corpus) plus [CLS], [SEP], [MASK]; the token
        # cache is keyed by the tokenizer's content, so it is this tokenizer's own.
        if self.tokenizer is None:
            self.tokenizer = with_special_tokens(super()._get_tokenizer(), BERT_SPECIALS)
        return self.tokenizer

    def setup(self, stage: str | None = None) -> None:
        if isinstance(self.train_set, MaskedBlocks):
            return
        super().setup(stage)
        assert isinstance(self.train_set, TokenBlocks) and isinstance(self.val_set, TokenBlocks)
        assert self.tokenizer is not None
        body = self.block_size - 2  # room for [CLS] and [SEP]
        for name, fixed in (("train_set", False), ("val_set", True)):
            blocks: TokenBlocks = getattr(self, name)
            blocks = TokenBlocks(blocks.path, blocks.dtype, body)
            setattr(
                self, name, MaskedBlocks(blocks, self.tokenizer, self.mask_probability, self.whole_word_masking, fixed)
            )
