"""Training: the one loop that pretraining and fine-tuning both run, and their setups. Imports the
layers below."""
