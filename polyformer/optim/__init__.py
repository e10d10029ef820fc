"""Optimizers beyond torch's: Muon for hidden matrices with AdamW for the rest, in one optimizer. Plain PyTorch."""

from .muon import Muon, newton_schulz, split_muon_groups, update_scale

__all__ = ["Muon", "newton_schulz", "split_muon_groups", "update_scale"]
