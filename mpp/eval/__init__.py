"""Evaluation of a model: frozen features, the probes (few-shot, linear, k-NN), the in-run evaluators,
pictures, and timm weights in and out. Imports the layers below."""
