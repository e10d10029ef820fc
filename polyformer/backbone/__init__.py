"""The shared transformer backbone: plain PyTorch, no tasks, data or Lightning."""

from .attention import Attention, build_mask
from .config import TransformerConfig
from .embeddings import PatchEmbedding, TokenEmbedding
from .layers import Block, FeedForward
from .positional import sinusoidal
from .transformer import Cache, Transformer, cache_length, init_weights, reorder_cache, weight_count

__all__ = [
    "Attention",
    "Block",
    "Cache",
    "FeedForward",
    "PatchEmbedding",
    "TokenEmbedding",
    "Transformer",
    "TransformerConfig",
    "build_mask",
    "cache_length",
    "init_weights",
    "reorder_cache",
    "sinusoidal",
    "weight_count",
]
