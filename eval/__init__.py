"""Evaluations of pretrained ViTs (few-shot linear probes)."""
