"""Backbones by name: ``register_backbone`` / ``create_backbone`` (after timm's registry).

Every backbone is an ``nn.Module`` whose ``forward(x)`` returns a list of the feature maps of its
last three stages (all at the backbone's output stride), and which exposes:

* ``stage_channels: tuple[int, int, int]`` - channels of those three maps;
* ``out_channels: int`` - channels of the last one (``stage_channels[-1]``);
* ``output_stride: int`` - spatial reduction of the maps (8 for the reference backbones);
* ``frozen_prefixes: tuple[str, ...]`` - parameter name prefixes that the reference never trains;
* ``train(mode)`` keeps frozen BatchNorm layers in eval mode where the reference does.

A YAML config picks a backbone by name (``eps.backbone: resnet38``); builders take keyword arguments
only and no config objects.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["register_backbone", "create_backbone", "list_backbones"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: make a builder available to :func:`create_backbone` under ``name``."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn

    return deco


def _ensure_builtin() -> None:
    # Importing the modules registers their builders; kept lazy so the registry has no import cycle.
    from wsss_tune.models import backbones  # noqa: F401


def list_backbones() -> list[str]:
    _ensure_builtin()
    return sorted(_REGISTRY)


def create_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Build the backbone registered as ``name`` (e.g. ``resnet38``, ``resnet101``, ``tiny``)."""
    _ensure_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**kwargs)
