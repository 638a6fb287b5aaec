"""Masked patch prediction: pretraining Vision Transformers by predicting masked patches."""
