"""``LoRAStepOptimizer``: the paper's step on every LoRA pair of a model (package docstring)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .._validate import positive_float
from ..step_size import Armijo, theorem_eta
from . import norms, search
from .capture import Capture, CapturedLayer
from .layers import lora_layers
from .search import item


@dataclass
class StepInfo:
    """The numbers of the last step, at the old iterate V'_t (scaling folded in)."""

    eta: float          # the step taken
    eta_theorem: float  # eq. (8); with norm="lazy" where ||G|| was not computed, eq. (8)
                        # with ||G|| = 0, an upper bound of eta_t that eta exceeds
    g_norm: float | None  # ||G||_F over all layers (or its bound, norm="bound"); None
                          # with norm="lazy" where the search did not need it
    v_sq: float         # ||V'||^2
    grad_sq: float      # ||grad J(V')||^2
    loss: float | None  # the closure's loss at V_t, if a closure was given
    trials: int         # closure calls of the line search beyond the first
    trial_losses: tuple = ()  # the loss at each trial (forward only); the last one is
                              # J(V_{t+1}) when a trial was accepted (eta > eta_theorem)


class LoRAStepOptimizer(torch.optim.Optimizer):
    """Gradient descent on all LoRA pairs of a model with eta_t of Mu & Klabjan (2025).

    Parameters
    ----------
    model : an ``nn.Module`` holding PEFT LoRA layers or ``lorakern.torch.LoRALinear``s (see
        the module docstring for what a step computes and how the scaling is folded in).
    lipschitz : the user's L (> 0); eta_t uses max(L, 1). A network's loss has no global L:
        see the module docstring.
    norm : "exact" (||Delta_l^T X_l||_F on the tensors' device; the module docstring says
        which code computes it), "bound" (a certified upper bound, cheaper; a smaller
        eta_t) or "lazy" (``step(closure)`` only: the exact norm, computed only when a trial
        of the line search comes down to 1 / (5 sqrt(2) max(L, 1) ||V'||^2), eq. 8 with
        ||G|| = 0, which bounds eta_t from above: an accepted eta beyond it is >= eta_t
        whatever ||G|| is; ``last.g_norm`` is None on the steps that skipped it; without a
        closure, "exact").
    adapter : the PEFT adapter to train (default: the active ones).
    cap, c, max_trials : the line search of ``step(closure)`` (``search.LineSearch``:
        forward-only trials, c = 1/5 by default so every accepted step is certified).
    line_search : "model" (``search.LineSearch``: the first trial from the last step's
        quadratic model, a guard on ||V'||^2) or "halving" (``lorakern.Armijo``'s: twice the
        last eta, halved; c = 1e-4 is its usual constant).

    Attributes
    ----------
    device : "cpu" (the norms run in float64 torch products, or in lorakern's kernels for
        large layers), "cuda:<i>" (CuPy), or "mixed" when the layers live on several devices.
    last : StepInfo of the last step, or None.

    Raises
    ------
    TypeError : ``model`` is not an ``nn.Module``; an argument of the wrong type.
    ValueError : no LoRA layer in ``model`` (or none with the ``adapter`` named), or one the
        theory does not cover (LoRA dropout, DoRA, embeddings, convolutions, a LoRA bias,
        merged adapters); a bad argument's value.
    """

    def __init__(self, model: nn.Module, *, lipschitz: float = 1.0, norm: str = "exact",
                 adapter: str | None = None, cap: float = 1.0, c: float = search.LEMMA2_C,
                 max_trials: int = 20, line_search: str = "model"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if norm not in ("exact", "bound", "lazy"):
            raise ValueError(f"norm must be 'exact', 'bound' or 'lazy', got {norm!r}")
        self.lipschitz = positive_float("lipschitz", lipschitz)
        self.norm = norm
        if line_search not in ("model", "halving"):
            raise ValueError(f"line_search must be 'model' or 'halving', got {line_search!r}")
        self.armijo = Armijo(cap=cap, c=c, max_trials=max_trials)  # validates them
        self.line_search = (search.LineSearch(cap=cap, c=c, max_trials=max_trials)
                            if line_search == "model" else None)
        found = lora_layers(model, adapter)
        if not found and adapter is not None and lora_layers(model):
            raise ValueError(f"no LoRA layer of {type(model).__name__} has an active adapter "
                             f"named {adapter!r}")
        if not found:
            raise ValueError(f"no LoRA layer found in {type(model).__name__}: wrap its linear "
                             f"layers with peft.get_peft_model(model, LoraConfig(...)) or "
                             f"lorakern.torch.LoRALinear")
        self.layers = [CapturedLayer(name, module, pairs) for name, module, pairs in found]
        params = [p for layer in self.layers for B, A, _ in layer.pairs for p in (B, A)]
        super().__init__(params, dict(lipschitz=self.lipschitz))
        devices = sorted({str(p.device) for p in params})
        self.device = ("mixed" if len(devices) > 1 else
                       "cuda:%d" % params[0].device.index if params[0].is_cuda else devices[0])
        self.last: StepInfo | None = None
        self._eta_prev = None
        self.capture = Capture(self.layers)

    @property
    def _norm_kind(self) -> str:
        return "bound" if self.norm == "bound" else "exact"

    def remove_hooks(self) -> None:
        """Detach the optimizer from the model (its hooks); it cannot step afterwards."""
        self.capture.remove()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients and what the hooks kept (X and Delta of the last passes).

        Inside a forward-only trial of ``step(closure)`` (``search.in_trial()``) it does
        nothing: the trial computes no gradient, and the gradients of V_t stay for the
        update (a ``model.zero_grad()`` in the closure still zeroes the other parameters'
        gradients in every trial; the LoRA pairs' are restored after the search).
        """
        if search.in_trial():
            return
        super().zero_grad(set_to_none=set_to_none)
        self.capture.clear()

    # -- the step --------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One step on all LoRA pairs from the gradients and the kept X_l, Delta_l.

        Parameters
        ----------
        closure : None, or a callable that zeroes the gradients, runs the model, calls
            ``backward()`` and returns the loss (as for ``torch.optim.LBFGS``). Given, it is
            called once at V_t and then once per trial of the Armijo line search (module
            docstring); the step taken is at least eta_t.

        Returns
        -------
        The closure's loss at V_t, or None. ``self.last`` holds the step's numbers
        (``StepInfo``).

        Raises
        ------
        RuntimeError : a layer has gradients but the hooks saw no forward pass or no backward
            pass through it (the pass ran before the optimizer was made, or under no_grad).
        DeviceUnavailableError : CUDA tensors without CuPy (``pip install ".[cuda]"``).
        """
        if not self.capture.attached:
            raise RuntimeError("remove_hooks() was called: this optimizer cannot step")
        loss = None
        if closure is not None:
            self.capture.clear()
            with torch.enable_grad():
                loss = closure()
        lipschitz = max(self.lipschitz, 1.0)
        v_sq, grad_sq = norms.v_and_grad_sq(self.layers)
        rows = norms.kept_rows(self.layers)  # references; the trials' zero_grad clears the hooks'
        lazy = self.norm == "lazy" and closure is not None and self.line_search is not None
        g_norm = None if lazy else math.sqrt(norms.rows_g_sq(rows, self._norm_kind))

        def eta_of_norm():  # eq. (8); with norm="lazy" the exact ||G|| is computed here, once
            nonlocal g_norm
            if g_norm is None:
                g_norm = math.sqrt(norms.rows_g_sq(rows, "exact"))
            return float(theorem_eta(v_sq, g_norm, lipschitz))

        grads = [(B, A, s, _grad(B), _grad(A)) for layer in self.layers
                 for B, A, s in layer.pairs]
        old = [(B.detach().clone(), A.detach().clone()) for B, A, *_ in grads]
        losses = ()
        if closure is None:
            eta = eta_of_norm()
        else:
            # eq. (8) with ||G|| = 0 bounds eta_t from above: a trial beyond it needs no norm
            ceiling = float(theorem_eta(v_sq, 0.0, lipschitz)) if lazy else None
            eta, losses = self._line_search(closure, item(loss), grads, old, grad_sq,
                                            eta_of_norm, v_sq, ceiling)
        # norm="lazy" where no trial came near eta_t: the ceiling, which eta exceeds
        eta_theorem = eta_of_norm() if g_norm is not None else ceiling
        self._update(grads, old, eta)
        self.last = StepInfo(eta=eta, eta_theorem=eta_theorem, g_norm=g_norm, v_sq=v_sq,
                             grad_sq=grad_sq, loss=None if loss is None else item(loss),
                             trials=len(losses), trial_losses=tuple(losses))
        self.capture.clear()
        return loss

    @staticmethod
    def _update(grads, old, eta):
        """B = B_t - (eta / s) grad_B, A likewise, all from the old iterate (eq. 3)."""
        for (B, A, s, gB, gA), (B0, A0) in zip(grads, old):
            B.copy_(B0 - gB * (eta / s))
            A.copy_(A0 - gA * (eta / s))

    def _line_search(self, closure, loss0, grads, old, grad_sq, eta_theorem, v_sq, ceiling):
        """The search with forward-only trials, p.grad and the captures of V_t kept."""
        saved = [(B.grad, A.grad) for B, A, *_ in grads]
        self.capture.enabled = False

        def loss_at(eta):  # forward only; under DDP: all-reduce the value here
            self._update(grads, old, eta)
            return search.trial_loss(closure)

        try:
            if self.line_search is not None:
                v_dot_grad = norms.v_dot_grad(grads, old)
                eta, losses = self.line_search.search(loss_at, loss0, grad_sq, eta_theorem,
                                                      v_sq=v_sq, v_dot_grad=v_dot_grad,
                                                      eta_ceiling=ceiling)
                return eta, losses
            eta, losses = search.armijo(loss_at, loss0, grad_sq, eta_theorem(),
                                        armijo=self.armijo, eta_prev=self._eta_prev)
            self._eta_prev = eta  # as lorakern.Armijo keeps it
            return eta, losses
        finally:
            self.capture.enabled = True
            for (B, A, *_), (gB, gA) in zip(grads, saved):
                B.grad, A.grad = gB, gA



def _grad(p):
    return torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
