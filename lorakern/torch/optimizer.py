"""``LoRAStepOptimizer``: the paper's step on every LoRA pair of a model (package docstring)."""
from __future__ import annotations

import dataclasses
import math
import warnings
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from .._validate import positive_float
from ..step_size import Armijo, theorem_eta
from . import distributed, norms, search
from .capture import Capture, Record, remove_handles
from .layers import lora_layers, tap_groups

#: relative residual of p.grad against the captures' predicted gradients (after the best
#: scalar) above which the captures are stale: float32/float64 gradients agree with the
#: prediction to ~1e-6 (float32 rounding of two orderings of one sum); bf16/fp16 ones to
#: their own rounding, ~4e-3
MATCH_TOL = {torch.float64: 1e-6, torch.float32: 1e-3, torch.bfloat16: 5e-2,
             torch.float16: 5e-2}


@dataclass
class StepInfo:
    """The numbers of the last step, at the old iterate V'_t (scaling folded in)."""

    eta: float          # the step taken
    eta_theorem: float  # eq. (8), from the applied gradients' ||G||; with norm="lazy" where
    #                     ||G|| was not computed, eq. (8) with ||G|| = 0: an upper bound of
    #                     eta_t that eta exceeds
    g_norm: float | None  # ||G||_F of the applied gradients (or its bound, norm="bound");
    #                       None with norm="lazy" where the search did not need it
    v_sq: float         # ||V'||^2
    grad_sq: float      # ||grad J(V')||^2 of the applied gradients
    loss: float | None  # the closure's loss at V_t (mean over ranks), if a closure was given
    trials: int         # closure calls of the line search beyond the first
    lr: float = 1.0     # param_groups[0]["lr"], the multiplier of eta
    grad_scale: float = 1.0   # p.grad / (the captures' gradients): 1/S after a GradScaler's
    #                           unscale_, the clip factor after clip_grad_norm_, else 1
    tried: list = field(default_factory=list)  # (eta, loss) of each line-search trial
    reduction: tuple | None = None  # under a process group, per layer: "rows" gathered or
    #                                 "sum" (G or U all-reduced); distributed.py

    @property
    def trial_losses(self) -> tuple:
        """The loss at each trial (forward only, mean over ranks); the last one is
        J(V_{t+1}) when a trial was accepted (eta > lr * eta_theorem)."""
        return tuple(loss for _, loss in self.tried)


class LoRAStepOptimizer(torch.optim.Optimizer):
    """Gradient descent on all LoRA pairs of a model with eta_t of Mu & Klabjan (2025).

    Parameters
    ----------
    model : an ``nn.Module`` holding PEFT LoRA layers or ``lorakern.torch.LoRALinear``s (see
        the package docstring for what a step computes and how the scaling is folded in),
        possibly wrapped in ``DistributedDataParallel`` or sharded by FSDP2's
        ``fully_shard`` (build the optimizer after it).
    lr : the multiplier of eta (``param_groups[0]["lr"]``, what schedulers write): the step
        is lr * eta_t (with ``step(closure)``: the line search runs on lr * cap down to
        lr * eta_t). lr = 1 is the paper's step; lr <= 1 keeps Lemma 2's decrease (its proof
        only bounds eta from above); lr > 1 voids the certificate and warns once.
    lipschitz : the user's L (> 0); eta_t uses max(L, 1). A network's loss has no global L:
        see the package docstring. Kept in ``param_groups[0]["lipschitz"]``.
    norm : "exact" (||Delta_l^T X_l||_F), "bound" (a certified upper bound, cheaper in
        memory and work; a smaller eta_t) or "lazy" (``step(closure)`` in one process only:
        the exact norm, computed only when a trial of the line search comes down to
        1 / (5 sqrt(2) max(L, 1) ||V'||^2), eq. 8 with ||G|| = 0, which bounds eta_t from
        above: an accepted eta beyond it is >= eta_t whatever ||G|| is; ``last.g_norm`` is
        None on the steps that skipped it; without a closure or under a process group,
        "exact").
    adapter : the PEFT adapter to train (default: the active ones).
    cap, c, max_trials : the line search of ``step(closure)`` (forward-only trials; c = 1/5
        by default, so every accepted step carries Lemma 2's decrease).
    line_search : "model" (``search.LineSearch``: the first trial from the last step's
        quadratic model, a guard on ||V'||^2) or "halving" (``lorakern.Armijo``'s: twice the
        last eta, halved; c = 1e-4 is its usual constant).
    others : the trainable parameters that are not LoRA adapters (PEFT's ``modules_to_save``
        heads, a classifier) are refused unless given to a companion optimizer here: an
        optimizer class or factory called with their list (``torch.optim.AdamW``,
        ``functools.partial(torch.optim.AdamW, lr=1e-4)``), or an optimizer instance that
        holds exactly them. It is stepped, zeroed and state-dicted with this one; its
        param_groups follow this optimizer's own in ``param_groups`` (the same dicts, so a
        scheduler sets its lr too and a GradScaler unscales its gradients).
    process_group : "auto" (default): the group of a ``DistributedDataParallel`` model, or
        of FSDP2's mesh, else torch.distributed's default group when it is initialised with
        several ranks, else none; None: this process alone; or a ``ProcessGroup``. With a
        group, ||G|| is the global one and the line search decides on the mean loss over ranks
        (lorakern/torch/distributed.py). FSDP2 with norm="exact"; FSDP1 and norm="bound"
        under FSDP2 are refused (same module says why).

    Attributes
    ----------
    device : "cpu", "cuda:<i>", or "mixed" when the layers live on several devices.
    last : StepInfo of the last step, or None: for loggers, with the standard step
        post-hooks (``register_step_post_hook``).
    others : the companion optimizer, or None.
    process_group : the group the step reduces over, or None.

    Raises
    ------
    TypeError : ``model`` is not an ``nn.Module``; an argument of the wrong type.
    ValueError : no LoRA layer in ``model`` (or none with the ``adapter`` named), or one the
        theory does not cover (DoRA, embeddings, convolutions, a LoRA bias, merged
        adapters); trainable parameters that are not LoRA adapters, named, without
        ``others``; FSDP1; norm="bound" under FSDP2; a bad argument's value.
    """

    def __init__(self, model: nn.Module, *, lr: float = 1.0, lipschitz: float = 1.0,
                 norm: str = "exact", adapter: str | None = None, cap: float = 1.0,
                 c: float = search.LEMMA2_C, max_trials: int = 20, line_search: str = "model",
                 others=None, process_group="auto"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if norm not in ("exact", "bound", "lazy"):
            raise ValueError(f"norm must be 'exact', 'bound' or 'lazy', got {norm!r}")
        if line_search not in ("model", "halving"):
            raise ValueError(f"line_search must be 'model' or 'halving', got {line_search!r}")
        lipschitz = positive_float("lipschitz", lipschitz)
        lr = positive_float("lr", lr)
        self.norm = norm
        self.armijo = Armijo(cap=cap, c=c, max_trials=max_trials)  # validates them
        self.line_search = (search.LineSearch(cap=cap, c=c, max_trials=max_trials)
                            if line_search == "model" else None)
        groups = tap_groups(model, adapter)
        if not groups and adapter is not None and lora_layers(model):
            raise ValueError(f"no LoRA layer of {type(model).__name__} has an active adapter "
                             f"named {adapter!r}")
        if not groups:
            raise ValueError(f"no LoRA layer found in {type(model).__name__}: wrap its linear "
                             f"layers with peft.get_peft_model(model, LoraConfig(...)) or "
                             f"lorakern.torch.LoRALinear")
        self.layers = [Record(name, module, pairs, scale, self._norm_kind)
                       for name, module, pairs, _, _, scale in groups]
        params = [p for rec in self.layers for p in rec.params()]
        self.process_group = distributed.resolve_group(model, process_group, params)
        # FSDP2: B and A are DTensor shards (distributed.py)
        self.sharded = distributed.shard_mesh(params) is not None
        self._fsdp_modules = distributed.fsdp_modules(model) if self.sharded else []
        if self.sharded and norm == "bound":
            raise ValueError("norm='bound' under FSDP2: its taps predict the gradients in the "
                             "backward pass, where the LoRA parameters are shards; use "
                             "norm='exact' (lorakern/torch/distributed.py)")
        self.others = _companion(model, params, others, adapter)
        self._building = True
        super().__init__(params, dict(lr=lr, lipschitz=lipschitz))
        self._building = False
        if self.others is not None:
            self.param_groups.extend(self.others.param_groups)
        devices = sorted({str(p.device) for p in params})
        self.device = ("mixed" if len(devices) > 1 else
                       "cuda:%d" % params[0].device.index if params[0].is_cuda else devices[0])
        self.last: StepInfo | None = None
        self._eta_prev = None
        self._warned_lr = False
        taps = [(rec, group[3], group[4]) for rec, group in zip(self.layers, groups)]
        self.capture = Capture(self.layers, taps)
        # the hooks go with the optimizer: they hold only a weakref to the Capture
        self._finalizer = weakref.finalize(self, remove_handles, self.capture.handles)

    @property
    def _norm_kind(self) -> str:
        """What the records keep and the norm computes: "lazy" is "exact", computed later."""
        return "bound" if self.norm == "bound" else "exact"

    @property
    def lipschitz(self) -> float:
        return float(self.param_groups[0]["lipschitz"])

    def remove_hooks(self) -> None:
        """Detach the optimizer from the model (its hooks); it cannot step afterwards."""
        self.capture.detach()

    def add_param_group(self, param_group) -> None:
        """Refused after construction: the step covers the LoRA pairs found in the model."""
        if getattr(self, "_building", False):
            return super().add_param_group(param_group)
        raise ValueError("LoRAStepOptimizer does not take add_param_group: its step covers the "
                         "LoRA pairs it found in the model; give other trainable parameters "
                         "to a companion optimizer (others=torch.optim.AdamW)")

    @torch.compiler.disable
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients (the companion's too) and what the hooks kept.

        Inside a forward-only trial of ``step(closure)`` (``search.in_trial()``) it does
        nothing: the trial computes no gradient, and the gradients of V_t stay for the
        update (the companion's gradients are kept the same way).
        """
        if search.in_trial():
            return
        super().zero_grad(set_to_none=set_to_none)
        self.capture.clear()

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self):
        """torch's, for this optimizer's own group (lr, lipschitz), plus the line search's
        state under "lorakern" and the companion's state_dict under "others"."""
        groups = self.param_groups
        self.param_groups = groups[:1]
        try:
            state = super().state_dict()
        finally:
            self.param_groups = groups
        state["lorakern"] = {"eta_prev": self._eta_prev, "warned_lr": self._warned_lr,
                             "line_search": (None if self.line_search is None
                                             else self.line_search.state_dict())}
        if self.others is not None:
            state["others"] = self.others.state_dict()
        return state

    def load_state_dict(self, state_dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("lorakern", {})
        others = state_dict.pop("others", None)
        if (others is None) != (self.others is None):
            raise ValueError("the state_dict's companion optimizer ('others') does not match "
                             "this optimizer's")
        if others is not None:
            self.others.load_state_dict(others)
        groups = self.param_groups
        self.param_groups = groups[:1]
        try:
            super().load_state_dict(state_dict)
        finally:
            self.param_groups = self.param_groups[:1] + (
                self.others.param_groups if self.others is not None else [])
        self._eta_prev = extra.get("eta_prev")
        self._warned_lr = extra.get("warned_lr", False)
        if self.line_search is not None and extra.get("line_search") is not None:
            self.line_search.load_state_dict(extra["line_search"])

    # -- the step --------------------------------------------------------------------------------
    # the step is a host loop on float64 scalars (norms, eta, the line search's decisions):
    # under torch.compile it runs eagerly, one graph break, as torch's own zero_grad does
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure=None):
        """One step on all LoRA pairs from the gradients and what the taps kept.

        Parameters
        ----------
        closure : None, or a callable that zeroes the gradients, runs the model, calls
            ``backward()`` and returns the loss (as for ``torch.optim.LBFGS``). Given, it is
            called once at V_t and then once per trial of the Armijo line search (package
            docstring); the step taken is at least lr * eta_t. Under a process group each
            call's loss is replaced by its mean over ranks.

        Returns
        -------
        The closure's loss at V_t, or None. ``self.last`` holds the step's numbers
        (``StepInfo``). The companion optimizer (``others``) steps too.

        Raises
        ------
        RuntimeError : the hooks were removed or replaced by a newer optimizer; a layer has
            gradients but the taps saw no pass through it; the gradients do not match the
            kept passes up to a scalar (stale captures).
        DeviceUnavailableError : CUDA tensors without CuPy (``pip install ".[cuda]"``).
        """
        if not self.capture.attached:
            raise RuntimeError("this optimizer's hooks were " + (
                "replaced by a newer LoRAStepOptimizer on the same model" if
                self.capture.replaced else "removed (remove_hooks())") + ": it cannot step")
        device = self.layers[0].pairs[0][0].device
        group = self.process_group
        loss = None
        if closure is not None:
            self.capture.clear()
            # the trials replay the gradient pass's random numbers: the same dropout masks,
            # so the decrease is certified for the function whose gradient is applied
            rng_before = _rng_state(device)
            with torch.enable_grad():
                loss = closure()
        loss0 = None if loss is None else distributed.global_mean(group, loss, device)
        for rec in self.layers:      # passes whose gradients were zeroed since
            if rec.passes and rec.grads_zeroed():
                rec.clear()
        _check_seen(self.layers)
        # norm="lazy" defers ||G|| (one process, with the model search): eq. (8) with ||G|| = 0
        # bounds eta_t from above, so a trial beyond that ceiling needs no norm
        lazy = (self.norm == "lazy" and closure is not None and group is None
                and self.line_search is not None)
        g_sq = None
        # FSDP2: the whole pairs for the predicted gradients, one all-gather a parameter
        pairs = distributed.full_pairs(self.layers) if self.sharded else None
        if group is None:
            if not lazy:
                g_sq = norms.g_sq(self.layers, self._norm_kind)
            preds = [rec.predicted(None if pairs is None else pairs[j])
                     for j, rec in enumerate(self.layers)]
            reduction = None
        else:
            g_sq, preds, reduction = distributed.reduce_records(group, self.layers,
                                                                self._norm_kind, device, pairs)
        # FSDP2: ||V'||^2 and ||grad J||^2 of the rank's shards, summed over the ranks with
        # the gradient check's sums (one all-gather; the same bits on every rank)
        v_sq, grad_sq = norms.v_and_grad_sq(self.layers)
        ratio, (v_sq, grad_sq) = _grad_scale(self.layers, preds, self.sharded,
                                             group if self.sharded else None, device,
                                             also=(v_sq, grad_sq))
        g_norm = None if g_sq is None else abs(ratio) * math.sqrt(g_sq)
        lipschitz = max(self.lipschitz, 1.0)

        def eta_of_norm() -> float:  # eq. (8); with norm="lazy" ||G|| is computed here, once
            nonlocal g_norm
            if g_norm is None:
                g_norm = abs(ratio) * math.sqrt(norms.g_sq(self.layers, "exact"))
            return float(theorem_eta(v_sq, g_norm, lipschitz))

        lr = float(self.param_groups[0]["lr"])
        if not lr >= 0.0:
            raise ValueError(f'param_groups[0]["lr"] must be >= 0 (it multiplies eta), got {lr}')
        if lr > 1.0 and not self._warned_lr:
            warnings.warn(f"lr = {lr:g} > 1 multiplies eta_t past the theorem's step: "
                          f"Lemma 2's decrease is no longer certified", stacklevel=2)
            self._warned_lr = True
        grads = [(B, A, s, _grad(B), _grad(A)) for rec in self.layers for B, A, s in rec.pairs]
        old = [(B.detach().clone(), A.detach().clone()) for B, A, *_ in grads]
        ceiling = float(theorem_eta(v_sq, 0.0, lipschitz)) if lazy else None
        tried = []
        if closure is not None and lr > 0.0:  # lr = 0 (a warm-up's first step): no move
            rng_after = _rng_state(device)
            try:
                eta, tried = self._line_search(closure, loss0, grads, old, grad_sq, eta_of_norm,
                                               v_sq, ceiling, lr, device, rng_before)
            finally:  # the random stream goes on as if no trial had run
                _set_rng_state(device, rng_after)
        else:
            eta = lr * eta_of_norm()
        # norm="lazy" where no trial came near eta_t: the ceiling, which eta exceeds
        eta_theorem = eta_of_norm() if g_norm is not None else ceiling
        self._update(grads, old, eta)
        if self.others is not None:
            self.others.step()
        self.last = StepInfo(eta=eta, eta_theorem=eta_theorem, g_norm=g_norm, v_sq=v_sq,
                             grad_sq=grad_sq, loss=loss0, trials=len(tried), lr=lr,
                             grad_scale=ratio, tried=tried, reduction=reduction)
        self.capture.clear()
        return loss

    def _update(self, grads, old, eta):
        """B = B_t - (eta / s) grad_B, A likewise, all from the old iterate (eq. 3);
        elementwise, so under FSDP2 each rank updates its own shards, and then drops the
        whole parameters a forward without gradients left gathered (FSDP2 keeps the root's
        after such a forward, a line-search trial's among them: the next forward would run
        on them, stale)."""
        local = distributed.local
        for (B, A, s, gB, gA), (B0, A0) in zip(grads, old):
            local(B).copy_(local(B0) - local(gB) * (eta / s))
            local(A).copy_(local(A0) - local(gA) * (eta / s))
        for module in self._fsdp_modules:
            module.reshard()

    def _line_search(self, closure, loss0, grads, old, grad_sq, eta_of_norm, v_sq, ceiling,
                     lr, device, rng):
        """The search on lr * cap down to lr * eta_t, with forward-only trials whose loss is
        the mean over ranks (every rank takes the same decisions), p.grad and the captures
        of V_t kept away from the trials: (eta, [(eta, loss) of each trial])."""
        saved = [(B.grad, A.grad) for B, A, *_ in grads]
        tried = []

        def loss_at(eta):
            self._update(grads, old, eta)
            _set_rng_state(device, rng)
            value = distributed.global_mean(self.process_group, search.trial_loss(closure),
                                            device)
            tried.append((eta, value))
            return value

        def floor():  # lr * eta_t (the norm computed here first with norm="lazy")
            return lr * eta_of_norm()

        self.capture.enabled = False
        try:
            if self.line_search is not None:
                self.line_search.cap = lr * self.armijo.cap
                eta, _ = self.line_search.search(
                    loss_at, loss0, grad_sq, floor, v_sq=v_sq,
                    v_dot_grad=self._v_dot_grad(grads, old, device),
                    eta_ceiling=None if ceiling is None else lr * ceiling)
            else:
                armijo = dataclasses.replace(self.armijo, cap=lr * self.armijo.cap)
                eta, _ = search.armijo(loss_at, loss0, grad_sq, floor(), armijo=armijo,
                                       eta_prev=self._eta_prev)
        finally:
            self.capture.enabled = True
            for (B, A, *_), (gB, gA) in zip(grads, saved):
                B.grad, A.grad = gB, gA
        self._eta_prev = eta  # as lorakern.Armijo keeps it
        return eta, tried

    def _v_dot_grad(self, grads, old, device) -> float:
        """<V', grad J(V')>; under FSDP2 the sum of the ranks' shards' (same bits on all)."""
        value = norms.v_dot_grad(grads, old)
        if self.sharded and self.process_group is not None:
            value = distributed.rank_ordered_sum(self.process_group, [value], device)[0]
        return value


def _rng_state(device):
    """torch's random state on the CPU and, for CUDA layers, on their device."""
    return (torch.get_rng_state(),
            torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(device, state) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def _grad(p):
    return torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()


def _check_seen(records) -> None:
    """A layer with gradients must have had a pass through the taps."""
    for rec in records:
        if rec.passes or rec.grads_zeroed():
            continue
        raise RuntimeError(f"layer {rec.name!r} has gradients but no captured input: was the "
                           f"forward pass run before the optimizer was made, or under "
                           f"torch.no_grad(), or was the backward pass not run?")


def _grad_scale(records, preds, sharded=False, group=None, device=None, also=()):
    """p.grad against the gradients the kept passes predict: the scalar that maps one onto
    the other (1/S after a GradScaler's unscale_, the factor of clip_grad_norm_; exactly 1
    within rounding); anything beyond a scalar is stale data, an error.

    Returns (the scalar, ``also``). FSDP2 (``sharded``): each rank compares its shard of
    p.grad with the same rows of the (whole, global) prediction, and the three sums, with
    the numbers in ``also``, are summed over the ranks (``group``): ``also`` comes back
    summed."""
    dots, pps, ggs = [], [], []   # float64 scalars on the tensors' devices, read at once
    tol = 0.0
    for rec, pred in zip(records, preds):
        if rec.half:  # autograd's products ran in bf16/fp16 (autocast): their rounding
            tol = max(tol, MATCH_TOL[torch.bfloat16])
        for (B, A, _), pair in zip(rec.pairs, pred or [None] * len(rec.pairs)):
            for p, q in zip((B, A), pair or (None, None)):
                g = None if p.grad is None else distributed.local(p.grad).detach().double()
                tol = max(tol, MATCH_TOL.get(p.dtype, 5e-2))
                if q is not None:
                    q = q.double()
                    if sharded:
                        q = q[distributed.shard_rows(p)]
                    pps.append(torch.sum(q * q))
                    if g is not None:
                        dots.append(torch.sum(g * q))
                if g is not None:
                    ggs.append(torch.sum(g * g))
    dot, pp, gg = _sums_on_host(dots, pps, ggs)
    if sharded and group is not None:
        dot, pp, gg, *also = distributed.rank_ordered_sum(group, [dot, pp, gg, *also], device)
    also = tuple(also)
    if gg == 0.0:
        return 1.0, also
    if pp == 0.0:
        raise RuntimeError("the LoRA layers have gradients but the taps kept no pass with "
                           "them: run forward and backward after the optimizer is made")
    ratio = dot / pp
    residual = math.sqrt(max(gg - dot * dot / pp, 0.0) / gg)
    if residual > tol:
        raise RuntimeError(f"the LoRA gradients do not match the passes the taps kept "
                           f"(relative residual {residual:.2e} beyond one scalar): stale "
                           f"captures, or gradients changed by something other than a "
                           f"scaling (loss scaling and clipping are scalings)")
    return (1.0 if abs(ratio - 1.0) <= tol else ratio), also


def _sums_on_host(*groups) -> list:
    """Each group's sum of float64 scalar tensors, added in order as Python floats (the bits
    of adding them one by one); from a GPU read back in one transfer (one host sync, not one
    a tensor), on the CPU read one by one (cheaper than stacking them)."""
    flat = [t for group in groups for t in group]
    if not flat or flat[0].device.type == "cpu":  # (mixed devices: right either way)
        values = [float(t) for t in flat]
    else:
        values = torch.stack([t.to(flat[0].device) for t in flat]).tolist()
    sums, start = [], 0
    for group in groups:
        total = 0.0
        for v in values[start:start + len(group)]:
            total += v
        sums.append(total)
        start += len(group)
    return sums


def _companion(model, lora_params, others, adapter):
    """The companion optimizer of the trainable non-LoRA parameters, or None; refuses them
    without one, named."""
    lora_ids = {id(p) for p in lora_params}
    extra = [(name, p) for name, p in model.named_parameters()
             if p.requires_grad and id(p) not in lora_ids]
    if adapter is not None:  # another adapter's LoRA weights are not this optimizer's concern
        extra = [(name, p) for name, p in extra if ".lora_" not in name]
    if others is None:
        if extra:
            names = ", ".join(name for name, _ in extra[:8])
            more = f" and {len(extra) - 8} more" if len(extra) > 8 else ""
            raise ValueError(f"trainable parameters that are not LoRA adapters: {names}{more}; "
                             f"the step covers LoRA pairs only: freeze them "
                             f"(requires_grad_(False)) or give them to a companion optimizer, "
                             f"LoRAStepOptimizer(model, others=torch.optim.AdamW)")
        return None
    params = [p for _, p in extra]
    if isinstance(others, torch.optim.Optimizer):
        held = {id(p) for g in others.param_groups for p in g["params"]}
        if held & lora_ids:
            raise ValueError("the companion optimizer (others=) holds LoRA adapters: it must "
                             "hold only the trainable parameters that are not")
        missing = [name for name, p in extra if id(p) not in held]
        if missing or len(held) != len(params):
            raise ValueError(f"the companion optimizer (others=) must hold exactly the "
                             f"trainable parameters that are not LoRA adapters; missing: "
                             f"{', '.join(missing[:8]) or 'none'}, extra: "
                             f"{len(held) - (len(params) - len(missing))}")
        return others
    if not callable(others):
        raise TypeError(f"others must be an optimizer, or an optimizer class or factory, got "
                        f"{type(others).__name__}")
    if not params:
        raise ValueError("others= was given but every trainable parameter is a LoRA adapter")
    companion = others(params)
    if not isinstance(companion, torch.optim.Optimizer):
        raise TypeError(f"others({len(params)} parameters) must return a torch.optim.Optimizer, "
                        f"got {type(companion).__name__}")
    return companion
