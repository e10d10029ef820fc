"""DeiT III's 3-Augment (AugmentConfig.auto_augment="3augment"): the model's input shape on grey and colour images of
any size, one of grayscale / solarisation / blur per image, and the same augmented sample for the same
(seed, epoch, index) under the loader's per-sample seeding (what exact resume relies on)."""

import numpy as np
import pytest
import torch
from PIL import Image

from polyformer.data.images import AugmentConfig, ImageDataModule, train_transform
from polyformer.data.loading import SeededSamples, sample_seed

AUG = AugmentConfig(auto_augment="3augment", hflip=0.0)


@pytest.mark.parametrize("size", [8, 32])
@pytest.mark.parametrize("channels", [1, 3])
def test_shape_on_grey_and_colour_images_of_any_size(size, channels):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8))
    transform = train_transform(size, channels, (0.5,) * channels, (0.5,) * channels, AUG)
    for _ in range(10):
        x = transform(image)
        assert x.shape == (channels, size, size) and x.dtype == torch.float32 and torch.isfinite(x).all()


def test_about_a_third_of_colour_images_come_out_grey():
    """Grayscale makes the channels equal and colour jitter keeps them so; solarisation and blur do not."""
    torch.manual_seed(0)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    transform = train_transform(
        16, 3, (0.0,) * 3, (1.0,) * 3, AugmentConfig(auto_augment="3augment", crop_scale=(1, 1))
    )
    grey = sum(bool(torch.allclose(x[0], x[1], atol=1e-2) and torch.allclose(x[1], x[2], atol=1e-2))
               for x in (transform(image) for _ in range(300)))  # fmt: skip
    assert 60 < grey < 140  # 1/3 of 300 = 100


def test_same_sample_for_the_same_seed_epoch_and_index():
    data = ImageDataModule(dataset="digits", augment=AugmentConfig(auto_augment="3augment", hflip=0.0))
    data.setup("fit")
    samples = SeededSamples(data.splits["train"])
    key = lambda seed, epoch, index: (index, sample_seed(seed, epoch, index))  # noqa: E731
    first = samples[[key(0, 1, 5), key(0, 1, 6)]]
    torch.manual_seed(123)  # the global stream in between does not matter: each sample is seeded by its key
    again = samples[[key(0, 1, 5), key(0, 1, 6)]]
    for (a, label_a), (b, label_b) in zip(first, again):
        assert torch.equal(a, b) and label_a == label_b
    others = [samples[key(0, epoch, 5)][0] for epoch in range(2, 8)]  # other epochs: other augmentations
    assert any(not torch.equal(first[0][0], x) for x in others)
