"""VLsI: Verbalized Layers-to-Interactions distillation for vision-language models."""

__version__ = "0.1.0"
