"""The hooks that keep each LoRA layer's input X_l (forward) and output gradient Delta_l (backward).

``||G_l||_F = ||Delta_l^T X_l||_F`` needs both; autograd gives neither to an optimizer. A
forward hook on the layer keeps X_l and registers a hook on the layer's output that keeps
Delta_l when the backward pass reaches it. Passes under ``torch.no_grad()`` keep nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class CapturedLayer:
    """One adapted layer: its module, its (B, A, s) pairs, and what the hooks kept."""

    name: str
    module: nn.Module
    pairs: list                      # (B, A, s): B (m x r) and A (r x n) Parameters
    inputs: list = field(default_factory=list)   # X rows of each forward (N_c x n)
    deltas: list = field(default_factory=list)   # Delta rows of each forward, or None

    def rows(self):
        """(X, Delta) of the passes whose backward reached the layer, stacked; or None."""
        kept = [(x, d) for x, d in zip(self.inputs, self.deltas) if d is not None]
        if not kept:
            return None
        if len(kept) == 1:
            return kept[0]
        return torch.cat([x for x, _ in kept]), torch.cat([d for _, d in kept])


class Capture:
    """The hooks on a list of layers; ``enabled`` turns capturing off (the line search's trials)."""

    def __init__(self, layers: list[CapturedLayer]):
        self.layers = layers
        self.enabled = True
        self.handles = [layer.module.register_forward_hook(self._hook(layer), with_kwargs=True)
                        for layer in layers]

    @property
    def attached(self) -> bool:
        return bool(self.handles)

    def _hook(self, layer: CapturedLayer):
        def forward_hook(module, args, kwargs, output):
            if not (self.enabled and torch.is_grad_enabled() and output.requires_grad):
                return None
            x = args[0] if args else next(iter(kwargs.values()))
            index = len(layer.inputs)
            layer.inputs.append(x.detach().reshape(-1, x.shape[-1]))
            layer.deltas.append(None)

            def keep_delta(grad):
                # several backward passes through one forward (retain_graph) add up
                g = grad.detach().reshape(-1, grad.shape[-1])
                old = layer.deltas[index]
                layer.deltas[index] = g if old is None else old + g

            output.register_hook(keep_delta)
            return None

        return forward_hook

    def clear(self) -> None:
        for layer in self.layers:
            layer.inputs.clear()
            layer.deltas.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
