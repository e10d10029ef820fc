"""scikit-learn's handwritten digits (the UCI "Optical Recognition of Handwritten Digits" test set, Alpaydin & Kaynak
1998): 1,797 grey 8x8 images of 10 classes that ship with scikit-learn, so image tasks train with no network.

The split is stratified 70/10/20 (train/val/test). The test split is drawn with a fixed seed and never depends on
`seed`, so every run and every task (classification, CLIP zero-shot) is scored on the same held-out images; `seed`
only reshuffles which of the remaining images are train and which are validation.
"""

from __future__ import annotations

from functools import cache
from typing import Literal

import numpy as np
import torch

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SPLITS = ("train", "val", "test")
_TEST_FRACTION, _VAL_FRACTION = 0.2, 0.1
_TEST_SEED = 0  # fixed forever: changing it would silently change every reported test accuracy


@cache
def _all_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # sklearn's intensities are counts 0..16 (pixels of a 32x32 bitmap per 4x4 block); scale to the usual 0..255.
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8)
    return images, bunch.target.astype(np.int64)


def load_digits_split(split: Literal["train", "val", "test"], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 8, 8) uint8 in 0..255 and labels (N,) int64 of one split."""
    if split not in SPLITS:
        raise ValueError(f"unknown digits split {split!r}: choose one of {', '.join(SPLITS)}")
    from sklearn.model_selection import train_test_split

    images, labels = _all_digits()
    index = np.arange(len(labels))
    rest, test = train_test_split(index, test_size=_TEST_FRACTION, stratify=labels, random_state=_TEST_SEED)
    if split == "test":
        chosen = test
    else:
        val_share = _VAL_FRACTION / (1.0 - _TEST_FRACTION)  # of the non-test images
        train, val = train_test_split(rest, test_size=val_share, stratify=labels[rest], random_state=seed)
        chosen = train if split == "train" else val
    chosen = np.sort(chosen)  # a stable order: loaders shuffle, evaluation does not need to
    return torch.from_numpy(images[chosen]).unsqueeze(1), torch.from_numpy(labels[chosen])
