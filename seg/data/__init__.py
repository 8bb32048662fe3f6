"""Cityscapes as shards: decoding, the manifest, transforms and augmentation, the loaders,
packing and the synthetic generator."""
