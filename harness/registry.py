"""Constructors by name, timm-style: a task's `create_model(name, ...)` builds whatever was
registered under `name`, so a config picks a model with one string and a new model is one decorator.

    MODELS = Registry("model")

    @MODELS.register                 # registered as "resnet9"
    def resnet9(...): ...

    @MODELS.register("unet")         # or under a name of its own (a class, say)
    class SmpUNet(nn.Module): ...

    MODELS.create("unet", width=0.5)
"""
from __future__ import annotations

from typing import Callable


class Registry:
    """Named constructors of one kind ("model"); `names()` sorted, for messages and config help."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Callable] = {}

    def register(self, name_or_fn=None):
        """Decorator: `@registry.register` (the function's or class's `__name__`) or
        `@registry.register("name")`. A name registered twice is an error, never a silent swap."""
        if callable(name_or_fn):
            return self.register(name_or_fn.__name__)(name_or_fn)

        def add(fn: Callable) -> Callable:
            name = name_or_fn or fn.__name__
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = fn
            return fn

        return add

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return sorted(self._entries)

    def items(self) -> list[tuple[str, Callable]]:
        return sorted(self._entries.items())

    def unknown(self, name: str) -> str:
        """The message for a name nobody registered."""
        return f"unknown {self.kind} {name!r}; known {self.kind}s: {', '.join(self.names())}"

    def get(self, name: str) -> Callable:
        if name not in self._entries:
            raise ValueError(self.unknown(name))
        return self._entries[name]

    def create(self, name: str, **kwargs):
        """What the constructor registered as `name` returns for `kwargs`."""
        return self.get(name)(**kwargs)
