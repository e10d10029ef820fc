"""Matched model pairs: ours and the reference implementations at the same width, depth, heads, MLP ratio,
sequence length or image size and batch, each peer built from its own package with random weights.

Sizes: "micro" (seconds, for the tests), "tiny" (CPU, fp32, 2 threads), "base" (GPU: GPT-2 124M, ViT-S/16,
CLIP ViT-B/32, transformer-base). Dropout is 0 on both sides (nanoGPT, timm and open_clip pretraining defaults).

Ours is the plain network a task trains (`polyformer.models`: GPT, ViT, EncoderDecoder, CLIP), built from its
config and called through its own forward, as the peers are: the model against the model, no Lightning around
either. Decoding (benchmarks/generation.py) times the task's `generate`, where sampling and beam search live.
Every contender gets the same loss on its logits (or embeddings), so the loss code does not decide the result; for
CLIP that is the task's own `contrastive_loss`. A case's FLOPs are our model's `training_flops`, the count the
training logs use for MFU.
Legend: B batch, T tokens, S source tokens, V vocabulary, D width.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polyformer.backbone import TransformerConfig, sinusoidal
from polyformer.tasks.contrastive_loss import contrastive_loss

from .timing import Contender

Size = Literal["micro", "tiny", "base"]
SIZES: tuple[Size, ...] = ("micro", "tiny", "base")
TASKS = ("lm", "vit", "mt", "clip")


@dataclass(frozen=True)
class Shape:
    """One matched configuration; fields a task does not use stay at their defaults."""

    width: int
    depth: int
    heads: int
    batch: int
    seq_len: int = 0  # LM context, MT target length, CLIP text context
    vocab: int = 0
    src_len: int = 0  # MT source length
    decoder_depth: int = 0  # MT
    image_size: int = 0
    patch_size: int = 0
    classes: int = 0
    mlp_ratio: float = 4.0
    activation: str = "gelu"
    text_width: int = 0  # CLIP text tower
    text_depth: int = 0
    text_heads: int = 0
    embed_dim: int = 0  # CLIP joint space
    label: str = ""

    def describe(self, task: str) -> str:
        if task == "lm":
            return (
                f"{self.label}: d{self.width} L{self.depth} h{self.heads} T{self.seq_len} V{self.vocab} B{self.batch}"
            )
        if task == "vit":
            return (
                f"{self.label}: d{self.width} L{self.depth} h{self.heads} {self.image_size}px/{self.patch_size} "
                f"{self.classes} classes B{self.batch}"
            )
        if task == "mt":
            return (
                f"{self.label}: d{self.width} L{self.depth}+{self.decoder_depth} h{self.heads} S{self.src_len} "
                f"T{self.seq_len} V{self.vocab} {self.activation} B{self.batch}"
            )
        return (
            f"{self.label}: image d{self.width} L{self.depth} {self.image_size}px/{self.patch_size}, text "
            f"d{self.text_width} L{self.text_depth} T{self.seq_len} V{self.vocab}, embed {self.embed_dim} B{self.batch}"
        )


SHAPES: dict[str, dict[Size, Shape]] = {
    "lm": {
        "micro": Shape(width=32, depth=2, heads=2, batch=2, seq_len=16, vocab=128, label="micro"),
        "tiny": Shape(width=256, depth=4, heads=4, batch=8, seq_len=256, vocab=8192, label="tiny GPT"),
        "base": Shape(width=768, depth=12, heads=12, batch=16, seq_len=1024, vocab=50257, label="GPT-2 124M"),
    },
    "vit": {
        "micro": Shape(width=32, depth=2, heads=2, batch=2, image_size=16, patch_size=8, classes=10, label="micro"),
        "tiny": Shape(
            width=192, depth=6, heads=3, batch=32, image_size=64, patch_size=8, classes=100, label="ViT-Ti/8 64px"
        ),
        "base": Shape(
            width=384, depth=12, heads=6, batch=256, image_size=224, patch_size=16, classes=1000, label="ViT-S/16"
        ),
    },
    "mt": {
        "micro": Shape(
            width=32, depth=1, decoder_depth=1, heads=2, batch=2, src_len=12, seq_len=10, vocab=128, label="micro"
        ),
        "tiny": Shape(
            width=256,
            depth=3,
            decoder_depth=3,
            heads=4,
            batch=16,
            src_len=64,
            seq_len=64,
            vocab=8000,
            activation="relu",
            label="tiny transformer",
        ),  # fmt: skip
        "base": Shape(
            width=512,
            depth=6,
            decoder_depth=6,
            heads=8,
            batch=64,
            src_len=128,
            seq_len=128,
            vocab=32000,
            activation="relu",
            label="transformer-base",
        ),  # fmt: skip
    },
    "clip": {
        "micro": Shape(
            width=32,
            depth=1,
            heads=2,
            image_size=16,
            patch_size=8,
            text_width=32,
            text_depth=1,
            text_heads=2,
            seq_len=8,
            vocab=128,
            embed_dim=16,
            batch=4,
            label="micro",
        ),  # fmt: skip
        "tiny": Shape(
            width=256,
            depth=4,
            heads=4,
            image_size=64,
            patch_size=8,
            text_width=256,
            text_depth=4,
            text_heads=4,
            seq_len=32,
            vocab=8192,
            embed_dim=256,
            batch=32,
            label="tiny CLIP",
        ),  # fmt: skip
        "base": Shape(
            width=768,
            depth=12,
            heads=12,
            image_size=224,
            patch_size=32,
            text_width=512,
            text_depth=12,
            text_heads=8,
            seq_len=77,
            vocab=49408,
            embed_dim=512,
            batch=256,
            label="CLIP ViT-B/32",
        ),  # fmt: skip
    },
}


@dataclass
class Case:
    """One task at one size: the contenders doing identical work, and what a step processes."""

    task: str
    shape: Shape
    unit: str  # "tok" or "img"
    items: int  # tokens or images per training step
    contenders: list[Contender]
    # (ours, peer) names to compare; several when ours has variants (GPT-2's tanh GELU)
    pairs: list[tuple[str, str, str]]  # (ours, peer, note)
    flops_per_step: float  # model training FLOPs of one step, for MFU (see `_flops`)


def _cfg(s: Shape, **kw: Any) -> TransformerConfig:
    base = dict(width=s.width, depth=s.depth, heads=s.heads, mlp_ratio=s.mlp_ratio, activation=s.activation)
    base.update(dropout=0.0)
    base.update(kw)
    return TransformerConfig(**base)


def _ce(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten())


class _Tokenizer:
    """The few ids a task reads from its tokenizer; the benchmark feeds token ids, never text."""

    def __init__(self, vocab: int) -> None:
        self.pad_id, self.bos_id = 0, 1
        self.eos_id = vocab  # outside the vocabulary: decoding runs to its length limit, like min_new_tokens
        self.special_ids: list[int] = []
        self.vocab_size = vocab


def _flops(flops: float) -> float:
    """Model FLOPs of one training step: our model's own `training_flops` (6N + 12LTD, see
    `Transformer.training_flops`), the numerator of the MFU the training logs show.

    The peers use the same number rather than a count of their own: every contender does the same work on the same
    batch, so MFU compares step times exactly as the throughput ratio does. A count per peer would only add layout
    details (GPT-2 6N counts its position table, ours the vocabulary padded to a multiple of 64): under 1% at
    GPT-2 124M."""
    return float(flops)


# ---- language model ---------------------------------------------------------------------------------------------
def ours_gpt(s: Shape, activation: str, device: torch.device) -> nn.Module:
    """Our plain GPT (`polyformer.models.gpt`): the network the language-model task trains, timed without the task."""
    from polyformer.models.gpt import GPT, GPTConfig

    cfg = _cfg(s, causal=True, position="learned", max_len=s.seq_len, activation=activation)
    return GPT(GPTConfig(cfg, s.vocab)).to(device)


def ours_lm(s: Shape, activation: str, device: torch.device) -> nn.Module:
    """The language-model task around the same GPT, for its `generate` (sampling lives on the task)."""
    from polyformer.tasks.language_model import LanguageModel

    cfg = _cfg(s, causal=True, position="learned", max_len=s.seq_len, activation=activation)
    return LanguageModel(backbone=cfg, vocab_size=s.vocab).to(device)  # every size given: built in __init__


def gpt2_peer(s: Shape, activation: str, device: torch.device) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=s.vocab, n_positions=s.seq_len, n_embd=s.width, n_layer=s.depth, n_head=s.heads,
        n_inner=int(s.mlp_ratio * s.width), activation_function=activation,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa").to(device)


def lm_case(s: Shape, device: torch.device, gen: torch.Generator) -> Case:
    tokens = torch.randint(0, s.vocab, (s.batch, s.seq_len + 1), generator=gen).to(device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    contenders = []
    # GPT-2 uses tanh GELU ("gelu_new"), slow on CPU: compare both ways, each side at the same activation.
    for act, hf_act in (("gelu", "gelu"), ("gelu_tanh", "gelu_new")):
        ours = ours_gpt(s, act, device)
        contenders.append(
            Contender(f"polyformer {act}", ours, lambda m=ours: _ce(m(x), y), lambda m=ours: m(x), ours=True)
        )
        peer = gpt2_peer(s, hf_act, device)
        contenders.append(
            Contender(
                f"transformers GPT2LMHeadModel {hf_act}",
                peer,
                lambda m=peer: _ce(m(input_ids=x).logits, y),
                lambda m=peer: m(input_ids=x).logits,
            )
        )
    pairs = [
        ("polyformer gelu", "transformers GPT2LMHeadModel gelu", "both exact GELU"),
        ("polyformer gelu_tanh", "transformers GPT2LMHeadModel gelu_new", "both tanh GELU (GPT-2's)"),
        ("polyformer gelu", "transformers GPT2LMHeadModel gelu_new", "each its default GELU"),
    ]
    flops = _flops(contenders[0].model.training_flops(s.batch, s.seq_len))  # both activations: the same FLOPs
    return Case("lm", s, "tok", s.batch * s.seq_len, contenders, pairs, flops)


# ---- image classification ---------------------------------------------------------------------------------------
def vit_case(s: Shape, device: torch.device, gen: torch.Generator) -> Case:
    import timm.models.vision_transformer as tv

    from polyformer.models.vit import ViT, ViTConfig

    images = torch.randn(s.batch, 3, s.image_size, s.image_size, generator=gen).to(device)
    labels = torch.randint(0, s.classes, (s.batch,), generator=gen).to(device)
    ours = ViT(ViTConfig(_cfg(s), s.image_size, s.patch_size, channels=3, num_classes=s.classes)).to(device)
    peer = tv.VisionTransformer(
        img_size=s.image_size, patch_size=s.patch_size, num_classes=s.classes, embed_dim=s.width, depth=s.depth,
        num_heads=s.heads, mlp_ratio=s.mlp_ratio, global_pool="token",
    ).to(device)  # fmt: skip
    contenders = [
        Contender("polyformer", ours, lambda: F.cross_entropy(ours(images), labels), lambda: ours(images), ours=True),
        Contender("timm VisionTransformer", peer, lambda: F.cross_entropy(peer(images), labels), lambda: peer(images)),
    ]
    pairs = [("polyformer", "timm VisionTransformer", "both exact GELU")]
    return Case("vit", s, "img", s.batch, contenders, pairs, _flops(ours.training_flops(images)))


# ---- translation ------------------------------------------------------------------------------------------------
def ours_seq2seq(s: Shape, device: torch.device) -> nn.Module:
    """Our plain EncoderDecoder (`polyformer.models.encoder_decoder`), the network the translation task trains."""
    from polyformer.models.encoder_decoder import EncoderDecoder, EncoderDecoderConfig

    cfg = _cfg(s, max_len=max(s.src_len, s.seq_len) + 64)
    return EncoderDecoder(EncoderDecoderConfig(cfg, s.vocab, s.vocab, decoder_depth=s.decoder_depth)).to(device)


def ours_mt(s: Shape, device: torch.device) -> nn.Module:
    """The translation task around the same model, for its `generate` (beam search lives on the task)."""
    from polyformer.tasks.translation import Translation

    task = Translation(
        _cfg(s, max_len=max(s.src_len, s.seq_len) + 64), decoder_depth=s.decoder_depth, vocab_size=s.vocab,
        source_vocab_size=s.vocab,
    )  # fmt: skip
    task.set_tokenizers(_Tokenizer(s.vocab))  # type: ignore[arg-type]
    return task.to(device)  # every size given: built in __init__


class TorchSeq2Seq(nn.Module):
    """The minimum around `torch.nn.Transformer` to make it a translation model (it has no embeddings or head)."""

    def __init__(self, s: Shape) -> None:
        super().__init__()
        self.embed = nn.Embedding(s.vocab, s.width)
        # nn.Transformer has no positions: add the backbone's own sinusoidal table, as our translation model does.
        positions = sinusoidal(torch.arange(max(s.src_len, s.seq_len)), s.width)  # (T, D)
        self.register_buffer("pe", positions, persistent=False)
        self.transformer = nn.Transformer(
            d_model=s.width, nhead=s.heads, num_encoder_layers=s.depth, num_decoder_layers=s.decoder_depth,
            dim_feedforward=int(s.mlp_ratio * s.width), dropout=0.0, activation=s.activation, batch_first=True,
            norm_first=True,
        )  # fmt: skip
        self.scale = math.sqrt(s.width)

    def forward(self, src: Tensor, tgt: Tensor) -> Tensor:
        e = lambda t: self.embed(t) * self.scale + self.pe[: t.shape[1]]  # noqa: E731
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1], device=tgt.device)
        pad = src == 0
        h = self.transformer(
            e(src), e(tgt), tgt_mask=causal, tgt_is_causal=True, src_key_padding_mask=pad, memory_key_padding_mask=pad
        )
        return F.linear(h, self.embed.weight)


def marian_peer(s: Shape, device: torch.device) -> nn.Module:
    from transformers import MarianConfig, MarianMTModel

    ffn = int(s.mlp_ratio * s.width)
    cfg = MarianConfig(
        vocab_size=s.vocab, d_model=s.width, encoder_layers=s.depth, decoder_layers=s.decoder_depth,
        encoder_attention_heads=s.heads, decoder_attention_heads=s.heads, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn,
        activation_function=s.activation, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        max_position_embeddings=max(s.src_len, s.seq_len) + 64, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=1, scale_embedding=True, share_encoder_decoder_embeddings=True,
    )  # fmt: skip
    return MarianMTModel._from_config(cfg, attn_implementation="sdpa").to(device)


def mt_case(s: Shape, device: torch.device, gen: torch.Generator) -> Case:
    # Real batches are padded, so every contender gets the source padding mask (no row is actually padded here).
    src = torch.randint(2, s.vocab, (s.batch, s.src_len), generator=gen).to(device)
    tgt = torch.randint(2, s.vocab, (s.batch, s.seq_len + 1), generator=gen).to(device)
    tin, tout = tgt[:, :-1], tgt[:, 1:]
    ours, torch_peer, marian = ours_seq2seq(s, device), TorchSeq2Seq(s).to(device), marian_peer(s, device)
    mask = (src != 0).long()
    keep = src != 0  # our model's source padding mask: True at real tokens, as the task passes it
    marian_logits = lambda: marian(input_ids=src, attention_mask=mask, decoder_input_ids=tin).logits  # noqa: E731
    contenders = [
        Contender("polyformer", ours, lambda: _ce(ours(src, keep, tin), tout), lambda: ours(src, keep, tin), ours=True),
        Contender(
            "torch nn.Transformer", torch_peer, lambda: _ce(torch_peer(src, tin), tout), lambda: torch_peer(src, tin)
        ),
        Contender("transformers MarianMTModel", marian, lambda: _ce(marian_logits(), tout), marian_logits),
    ]
    pairs = [
        ("polyformer", "torch nn.Transformer", f"pre-LN both, {s.activation}"),
        ("polyformer", "transformers MarianMTModel", f"Marian is post-LN, {s.activation}"),
    ]
    flops = _flops(ours.training_flops(s.batch, s.src_len, s.seq_len))
    return Case("mt", s, "tok", s.batch * s.seq_len, contenders, pairs, flops)


# ---- CLIP -------------------------------------------------------------------------------------------------------
def clip_case(s: Shape, device: torch.device, gen: torch.Generator) -> Case:
    from open_clip.model import CLIP as OpenCLIP
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    from polyformer.models.clip import CLIP, CLIPConfig, ImageEncoderConfig, TextEncoderConfig

    images = torch.randn(s.batch, 3, s.image_size, s.image_size, generator=gen).to(device)
    tokens = torch.randint(1, s.vocab - 1, (s.batch, s.seq_len), generator=gen)
    tokens[:, -1] = s.vocab - 1  # end-of-text, the highest id: open_clip pools at the argmax, ours at eos_id
    tokens = tokens.to(device)
    image = ImageEncoderConfig(_cfg(s, position="none"), s.image_size, s.patch_size, channels=3, norm_pre=True)
    text = TextEncoderConfig(
        _cfg(s, width=s.text_width, depth=s.text_depth, heads=s.text_heads, causal=True, position="learned",
             max_len=s.seq_len)
    )  # fmt: skip
    ours = CLIP(CLIPConfig(image, text, s.embed_dim, vocab_size=s.vocab, eos_id=s.vocab - 1)).to(device)
    vision_cfg = CLIPVisionCfg(
        layers=s.depth, width=s.width, head_width=s.width // s.heads, mlp_ratio=s.mlp_ratio,
        patch_size=s.patch_size, image_size=s.image_size,
    )  # fmt: skip
    text_cfg = CLIPTextCfg(
        context_length=s.seq_len, vocab_size=s.vocab, width=s.text_width, heads=s.text_heads, layers=s.text_depth,
        mlp_ratio=s.mlp_ratio,
    )  # fmt: skip
    peer = OpenCLIP(s.embed_dim, vision_cfg, text_cfg, quick_gelu=False).to(device)
    # Both return (image, text, logit_scale) and get the loss our CLIP task trains with (one process: no gather).
    contenders = [
        Contender(
            "polyformer", ours, lambda: contrastive_loss(*ours(images, tokens)), lambda: ours(images, tokens), ours=True
        ),
        Contender(
            "open_clip CLIP", peer, lambda: contrastive_loss(*peer(images, tokens)), lambda: peer(images, tokens)
        ),
    ]
    pairs = [("polyformer", "open_clip CLIP", "both exact GELU")]
    return Case("clip", s, "img", s.batch, contenders, pairs, _flops(ours.training_flops(images, tokens)))


BUILDERS: dict[str, Callable[[Shape, torch.device, torch.Generator], Case]] = {
    "lm": lm_case,
    "vit": vit_case,
    "mt": mt_case,
    "clip": clip_case,
}


def build_case(task: str, size: Size, device: torch.device, seed: int = 0) -> Case:
    torch.manual_seed(seed)  # weights
    gen = torch.Generator().manual_seed(seed)  # inputs, drawn on CPU so every device sees the same batch
    return BUILDERS[task](SHAPES[task][size], device, gen)
