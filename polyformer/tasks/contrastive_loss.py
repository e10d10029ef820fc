"""The contrastive objectives of CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision", Figure 3: symmetric cross-entropy over the image-text similarity matrix) and SigLIP (Zhai et al. 2023:
a sigmoid per image-text pair) and their evaluation, all correct across DDP ranks.

Loss under DDP. Every rank gathers the embeddings of all ranks *with gradients* and computes the loss of its own B
rows against the global batch of N = W * B: l_r. The global loss is L = mean_r l_r (what `sync_dist` logs), equal to
the loss of one process on the whole batch. In backward, each rank's l_r sends gradients to every rank's rows; the
gather's backward sums them (all-reduce), so rank r holds W * dL/df_r, and DDP's gradient *average* divides the W
back out: parameter gradients equal the single-process ones. Without the gradient (open_clip's default
`gather_with_grad=False`), or with a backward that keeps only the local slice, the tower gradients come out W times
too small relative to the temperature's. The sigmoid loss gathers only the texts, by the same argument.
`tests/tasks/test_contrastive_ddp.py` checks both losses and their gradients with 2 processes against 1.

Evaluation gathers the embeddings of the whole evaluation set (ranks may hold different counts) and computes the
same numbers on every rank.

Legend: B local batch, N global batch / evaluation set, E embedding dim, C classes, W world size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from polyformer.data.loading import world_and_rank


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # (B, E) -> (W * B, E)
        world, rank = world_and_rank()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = slice(rank * x.shape[0], (rank + 1) * x.shape[0])
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # (W * B, E) -> (B, E)
        # Every rank's loss depends on our rows: sum their gradients. all-reduce + slice instead of reduce-scatter
        # because gloo (CPU) has no reduce-scatter.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rows]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate the equal-sized (B, E) tensors of all ranks, rank order, keeping the autograd graph."""
    if world_and_rank()[0] == 1:
        return x
    return _GatherWithGrad.apply(x)


def contrastive_loss(image: Tensor, text: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric InfoNCE of this rank's pairs against the global batch.

    image, text: (B, E) L2-normalised embeddings, row i of each a pair; logit_scale: the temperature's inverse, exp'd.
    Ranks must hold equal B (the training loader drops the last uneven batch).
    """
    B = image.shape[0]
    rank = world_and_rank()[1]
    all_image, all_text = gather_with_grad(image), gather_with_grad(text)  # (N, E)
    labels = torch.arange(rank * B, (rank + 1) * B, device=image.device)  # our pairs' columns in the global batch
    logits_per_image = logit_scale * image @ all_text.T  # (B, N)
    logits_per_text = logit_scale * text @ all_image.T  # (B, N)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def sigmoid_loss(image: Tensor, text: Tensor, logit_scale: Tensor, logit_bias: Tensor) -> Tensor:
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training", algorithm 1)
    of this rank's images against the texts of the global batch.

    Every (image i, text j) pair is a binary problem with logit z_ij = t * <x_i, y_j> + b and label l_ij = +1 for a
    pair, -1 otherwise; the loss is -1/N sum_ij log sigmoid(l_ij * z_ij), i.e. summed over texts, averaged over
    images. No softmax normalises over the batch, so only the texts are gathered (with gradients: see the module
    docstring; the images stay local) and each rank computes its (B, N) block of the N x N matrix; the mean over ranks
    of these losses is the 1-process loss on the global batch. The paper exchanges text chunks between neighbouring
    devices instead, which never holds all N texts at once; at our scale one all-gather of (N, E) is the simpler
    equal. image, text: (B, E) unit-norm; logit_scale t and logit_bias b: () scalars.
    """
    B = image.shape[0]
    rank = world_and_rank()[1]
    all_text = gather_with_grad(text)  # (N, E)
    logits = logit_scale * image @ all_text.T + logit_bias  # (B, N)
    labels = -torch.ones_like(logits)
    labels[:, rank * B : (rank + 1) * B].fill_diagonal_(1.0)  # our pairs' columns in the global batch
    return -F.logsigmoid(labels * logits).sum() / B


@torch.no_grad()
def gather_uneven(x: Tensor) -> Tensor:
    """Concatenate (n_r, ...) tensors of all ranks in rank order, where n_r may differ (no padding is kept)."""
    world = world_and_rank()[0]
    if world == 1:
        return x
    sizes = torch.tensor([x.shape[0]], device=x.device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(world)]
    dist.all_gather(all_sizes, sizes)
    counts = [int(s) for s in all_sizes]
    padded = x.new_zeros((max(counts), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, counts)])


def topk_hits(logits: Tensor, target: Tensor, ks: tuple[int, ...]) -> dict[int, Tensor]:
    """Per sample, whether the target is among the k highest logits: {k: (N,) bool}. logits (N, C), target (N,)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # (N, K)
    hit = top == target[:, None]
    return {k: hit[:, :k].any(dim=1) for k in ks}


def retrieval_recall(image: Tensor, text: Tensor, caption_group: Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict:
    """Recall@K of image->text and text->image retrieval over N pairs (image[i], text[i]).

    caption_group (N,): texts with the same group are the same caption (built-in data repeats captions such as
    "handwritten 7"); retrieving any copy of an image's caption is a hit, so identical texts cannot tie-break a hit
    into a miss. With distinct captions this is the usual index-based recall. Rows go in chunks, so a large
    evaluation set never holds the (N, N) similarity matrix at once.
    """
    kmax = min(max(ks), text.shape[0])
    out = {}
    for name, queries, keys in (("image_to_text", image, text), ("text_to_image", text, image)):
        hits = []
        for rows in torch.arange(len(queries), device=queries.device).split(4096):
            top = (queries[rows].float() @ keys.float().T).topk(kmax, dim=1).indices  # (n, K)
            hits.append(caption_group[top] == caption_group[rows, None])
        hit = torch.cat(hits)  # (N, K)
        for k in ks:
            out[f"{name}_R@{k}"] = hit[:, :k].any(dim=1).float().mean().item()
    return out
