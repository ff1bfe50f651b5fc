"""Checkpoints: the embedded generated models and validated local Hugging Face directories."""
