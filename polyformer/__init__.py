"""polyformer: one transformer backbone (Vaswani et al. 2017) for GPT language modelling, encoder-decoder
translation, ViT image classification and CLIP, trained with the Lightning Trainer."""

__version__ = "0.1.0"
