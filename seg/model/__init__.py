"""The DeepLabV3+ network and its weights files (export, import, pretrained backbones)."""
