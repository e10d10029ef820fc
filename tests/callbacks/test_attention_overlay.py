"""Attention rollout against its formula, the pooling token's patch map, heat overlays and the similarity matrix's
thumbnails, on hand-made inputs (no training)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from polyformer.callbacks.attention_rollout import attention_rollout, heat_overlay, patch_map
from polyformer.callbacks.media import attention_overlays, heatmap, resize, thumbnail_strip, to_image
from polyformer.tasks.media import AttentionOverlay


def test_rollout_of_identity_attention_is_the_identity():
    eye = torch.eye(5).expand(2, 5, 5)
    torch.testing.assert_close(attention_rollout([eye, eye, eye]), eye)


def test_rollout_of_two_layers_by_hand():
    a1 = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    a2 = torch.tensor([[0.5, 0.5], [0.0, 1.0]])
    # 0.5 A + 0.5 I: [[1, 0], [.25, .75]] and [[.75, .25], [0, 1]]; the later layer on the left.
    expected = torch.tensor([[0.75 * 1 + 0.25 * 0.25, 0.25 * 0.75], [0.25, 0.75]])
    torch.testing.assert_close(attention_rollout([a1[None], a2[None]])[0], expected)
    # Uniform attention stays uniform off the diagonal and rows still sum to 1.
    uniform = torch.full((1, 4, 4), 0.25)
    rolled = attention_rollout([uniform, uniform])
    torch.testing.assert_close(rolled.sum(-1), torch.ones(1, 4))
    with pytest.raises(ValueError, match="at least one layer"):
        attention_rollout([])


def test_patch_map_takes_the_class_token_row_or_the_mean_of_the_patch_rows():
    w = torch.rand(3, 7, 7)  # class token + a 2 x 3 grid
    cls = patch_map(w, prefix=1, grid=(2, 3), query=0)
    assert cls.shape == (3, 2, 3)
    torch.testing.assert_close(cls[1, 1], w[1, 0, 4:7])  # row 0, keys of the second grid row
    torch.testing.assert_close(patch_map(w, 1, (2, 3), None), w[:, 1:, 1:].mean(dim=1).view(3, 2, 3))
    with pytest.raises(ValueError, match="2x2 patch grid"):
        patch_map(w, prefix=1, grid=(2, 2), query=0)


def test_heat_overlay_keeps_the_size_and_colours_where_attention_is_high():
    image = np.full((40, 60, 3), 128, dtype=np.uint8)
    heat = torch.zeros(2, 3)
    heat[0, 0] = 1.0  # the top-left patch
    out = heat_overlay(image, heat)
    assert out.shape == image.shape and out.dtype == np.uint8
    change = np.abs(out.astype(int) - image).sum(-1)
    assert change[:10, :10].mean() > 3 * change[-10:, -10:].mean() > 0


def test_overlays_from_recorded_weights_per_layer_rollout_and_heads():
    T, n = 1 + 4 * 4, 3
    means = {f"tower.encoder.blocks.{i}.attn": torch.softmax(torch.randn(n, T, T), -1) for i in range(2)}
    heads = {k: torch.softmax(torch.randn(2, T, T), -1) for k in means}
    means["text.encoder.blocks.0.attn"] = torch.rand(n, 5, 5)  # another stack: ignored
    item = AttentionOverlay("a", [torch.rand(3, 16, 16) for _ in range(4)], "tower.encoder", 4, captions=list("wxyz"))
    figures = attention_overlays(item, means, heads)
    assert sorted(figures) == ["", "_heads"]
    assert all(f.ndim == 3 and f.dtype == np.uint8 for f in figures.values())
    # rows = the 3 recorded images, not the 4 given; a taller figure than the 2-row per-head one
    assert figures[""].shape[0] > figures["_heads"].shape[0]
    assert attention_overlays(AttentionOverlay("b", item.images, "other", 4), means, heads) == {}


def test_thumbnail_strip_puts_each_image_beside_its_row():
    images = [torch.rand(8, 8), torch.rand(3, 8, 8)]
    strip = thumbnail_strip(images, [(10.0, 40.0), (40.0, 70.0)], height=80)
    side = 28
    for image, top in zip(images, (11, 41)):
        assert np.array_equal(strip[top : top + side, 2 : 2 + side], resize(to_image(image, min_side=1), side))
    assert (strip[:10] == 255).all() and (strip[71:] == 255).all()


def test_similarity_heatmap_draws_one_thumbnail_per_row_left_of_the_matrix():
    n = 6
    plain = heatmap(torch.randn(n, n), "s", xlabels=[f"caption {i}" for i in range(n)])
    black = [torch.zeros(8, 8) for _ in range(n)]  # constant images scale to black thumbnails
    drawn = heatmap(torch.randn(n, n), "s", xlabels=[f"caption {i}" for i in range(n)], row_images=black)
    assert drawn.shape[0] == plain.shape[0]
    is_black = (drawn < 10).all(-1)
    column = is_black[:, : drawn.shape[1] // 3].sum(0).argmax()  # through the thumbnails, left of the matrix
    runs = np.flatnonzero(np.diff(np.r_[0, is_black[:, column].astype(int), 0]))
    starts, ends = runs[::2], runs[1::2]
    assert len(starts) == n, starts  # one thumbnail a row
    assert len(set((ends - starts).tolist())) == 1 and (ends - starts)[0] > 10  # all the same size
    gaps = np.diff(starts)
    assert gaps.max() - gaps.min() <= 1  # evenly spaced, as the matrix's rows are
