"""Registry of balancers by name (``balancer.name`` in configs)."""

from polytask.registry import Registry

BALANCERS: Registry = Registry("balancer", prefix="balancer.params")
