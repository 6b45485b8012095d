"""Registry of architectures by name (``model.arch`` in configs)."""

from polytask.registry import Registry

ARCHITECTURES: Registry = Registry("architecture", prefix="model.params")
