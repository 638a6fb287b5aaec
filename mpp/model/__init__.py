"""The ViT (timm's parameter names), the ops it is built with and the policy that picks our kernels, the
MPP objective and its targets, and weights checked against a config. Imports mpp.core and mpp.data."""
