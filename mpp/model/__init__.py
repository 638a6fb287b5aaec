"""The ViT (timm's parameter names), the ops it is built with and the policy that picks our kernels, the
MPP objective and its targets, and weights checked against a config. Imports mpp.core and mpp.data.

`mpp.model.ViT`, `ViTConfig` and `vit_config`, which the README documents, live in mpp.model.vit."""
from mpp.model.vit import ViT, ViTConfig, vit_config

__all__ = ["ViT", "ViTConfig", "vit_config"]
