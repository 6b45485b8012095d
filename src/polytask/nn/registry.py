"""Registry of architectures by name (``model.arch`` in configs)."""

from polytask.registry import Registry

ARCHITECTURES: Registry = Registry("architecture", prefix="model.params")

# model.arch adapters lives with the training code (a transformers backbone, imported on first use)
ARCHITECTURES.register_lazy("polytask.train.backbone", "adapters", "transformer_adapters")
