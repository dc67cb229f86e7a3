"""Shared machinery: model loading, data and packing, the one training loop, checkpoints, launch."""
