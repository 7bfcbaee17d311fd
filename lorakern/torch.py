"""The paper's step for the LoRA layers of a PyTorch model: ``LoRAStepOptimizer``.

Imported only by users who ask for it (``import lorakern.torch``); ``import lorakern`` never
imports torch. Needs ``pip install ".[torch]"`` in a clone of lorakern (torch; peft for PEFT
models).

    model = peft.get_peft_model(base, peft.LoraConfig(r=8, target_modules=[...]))
    opt = lorakern.torch.LoRAStepOptimizer(model)      # finds the LoRA layers, hooks them
    for X, y in batches:
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()                                      # eta_t of Mu & Klabjan, eq. (8)

**What a step computes.** A LoRA layer l computes ``y = x W0_l^T + s_l x A_l^T B_l^T``, i.e.
its weight is W_l = W0_l + s_l B_l A_l with the scaling s_l = alpha / r (alpha / sqrt(r) with
rsLoRA). The paper's iterate is a pair with W = W0 + B A and no scaling, so the scaling is
folded in exactly: with B'_l = sqrt(s_l) B_l and A'_l = sqrt(s_l) A_l the layer's weight is
W0_l + B'_l A'_l, and the step is the paper's step on V' = (B'_l, A'_l)_l:

    ||V'||^2      = sum_l s_l (||A_l||_F^2 + ||B_l||_F^2)
    grad_{B'} J   = G_l A'^T = sqrt(s_l) G_l A_l^T = grad_B J / sqrt(s_l)   (chain rule:
    grad_{A'} J   = grad_A J / sqrt(s_l)                                     grad_B J = s_l G_l A_l^T)
    ||grad J(V')||^2 = sum_l (||grad_B J||^2 + ||grad_A J||^2) / s_l
    B'_{t+1} = B'_t - eta grad_{B'}   <=>   B_{t+1} = B_t - (eta / s_l) grad_B J   (same for A)

where G_l = dJ/dW_l = Delta_l^T X_l, X_l the layer's inputs (tokens flattened to N_l rows)
and Delta_l = dJ/dy_l its output gradient (whatever the loss's normalisation is, a mean over
the batch included). ``grad_B J`` and ``grad_A J`` are autograd's ``p.grad``; what autograd
does not give is ||G_l||_F, which needs X_l and Delta_l: a forward hook keeps X_l and a
hook on the layer's output keeps Delta_l. ``step()`` then computes

    ||G||_F = (sum_l ||Delta_l^T X_l||_F^2)^(1/2)            exact: by the Gram identity
        <Delta Delta^T, X X^T> or from Delta^T X, whichever costs fewer multiply-adds. CPU
        layers of under TORCH_NORM_WORK multiply-adds (N m min(N, n)): two float64 torch
        products on the model's own torch threads (float64 accumulation, as lorakern's
        serial kernels); larger CPU layers: the linear kind's kernels
        (lorakern._cpu.linear.delta_x_norm_sq: BLAS products, Numba's ordered sums); CUDA
        tensors: CuPy (lorakern._cuda.linear.delta_x_norm_sq)
    eta_t = min{1 / (5 sqrt(2) max(L, 1) (||V'||^2 + ||G||_F)), 1}       (eq. 8)

and updates every A and B at once from the old iterate (eq. 3). Memory: the hooks keep
X_l and Delta_l of every forward pass with gradients since the last ``step()`` or
``zero_grad()`` (N_l (n_l + m_l) numbers per layer, references to tensors autograd keeps
anyway for X_l, new ones for Delta_l); passes under ``torch.no_grad()`` keep nothing. A layer's adapters of
several active PEFT adapters on one layer form one pair of rank r_1 + r_2 + ... (B' = [B'_1
B'_2 ...], A' stacked), with one G_l. Gradient accumulation works: several forward/backward
passes before ``step()`` sum both p.grad and Delta_l^T X_l (the captured rows are stacked).

**L.** ``lipschitz`` is the user's L. The paper assumes the loss L(W) is L-smooth in W
(Assumption 1); a network's loss as a function of all its LoRA layers' weights has no global
L (it is not even smooth across ReLUs), so no L is computed here and the theorem's
guarantees (Lemma 2's decrease, Theorem 3's rate) hold only where the given L bounds the
curvature along the path. The default L = 1 is the smallest the step size reads (max(L, 1)).
For one linear layer with the squared loss, L = sigma_max(X)^2 / N is what
``lorakern.LinearProblem(...).lipschitz`` certifies.

**norm="bound"** puts U_l = sum_i ||delta_i|| ||x_i|| (over the N_l rows) in place of
||Delta_l^T X_l||_F: G_l = sum_i delta_i x_i^T is a sum of rank-one matrices of norm
||delta_i|| ||x_i||, so U_l >= ||G_l||_F (and U_l <= ||Delta_l||_F ||X_l||_F by
Cauchy-Schwarz); computed in float64 and raised by a rounding margin, O(N (m + n)) work. A
larger norm only makes eta_t smaller, which keeps Lemma 2 (see LinearProblem's notes).

**Line search.** ``step(closure)`` runs Armijo backtracking on the closure's loss, as
``lorakern.Armijo`` does: the first trial is ``cap`` (or twice the last accepted eta), halved
until J(V' - eta grad) <= J(V') - c eta ||grad J(V')||^2, and once it would fall to eta_t it
takes eta_t (Lemma 2 gives it the decrease). Each trial calls the closure once (with
gradients enabled, as PyTorch's closures expect; the gradients of the trials are discarded
and p.grad is left as it was at V_t).

Not covered by the theory, and refused with a ValueError: LoRA dropout > 0 (the adapter's
input is then not the layer's input), DoRA (``use_dora``: a normalised weight, not W0 + s BA),
adapters on embeddings or convolutions (PEFT's ``lora_embedding_A``, Conv layers), a LoRA
bias (``lora_bias``), merged adapters.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import numpy as np

try:
    import torch
    from torch import nn
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError('lorakern.torch needs PyTorch: pip install ".[torch]" in a clone of '
                      'lorakern, which brings torch and peft') from exc

from ._validate import as_array, positive_float, positive_int
from .step_size import Armijo, theorem_eta

__all__ = ["LoRALinear", "LoRAStepOptimizer", "StepInfo", "lora_layers"]

#: relative slack on norm="bound": the float64 sums of sum_i ||delta_i|| ||x_i|| carry a
#: relative rounding below (N + max(m, n) + 2) eps_64, far under this for any N < 2^30
BOUND_MARGIN = 2.0 ** -20
#: CPU layers whose exact norm costs fewer multiply-adds than this (N m min(N, n)) get it
#: from two float64 torch products on the model's torch threads; larger ones from
#: lorakern._cpu.linear (NumPy's BLAS, whose own threads a torch loop wakes at every step:
#: 3.1 ms against 0.68 ms at N, m, n = 1347, 64, 64 in float32 between torch work, 13.8
#: against 10.7 ms at 2048, 256, 256, but 87 against 117 ms at 4096, 512, 512 where its
#: float32 products beat float64 ones; one torch thread, benchmarks/NOTES.md)
TORCH_NORM_WORK = 1 << 27


class LoRALinear(nn.Module):
    """A linear layer with a LoRA adapter: y = x W0^T + b + s x A^T B^T (W0, b frozen).

    Parameters
    ----------
    in_features, out_features, rank : positive integers (n, m, r).
    alpha : the LoRA alpha; the scaling is s = alpha / rank (default alpha = rank: s = 1).
    bias : whether the frozen layer has a bias.
    weight : optional (m, n) tensor for W0 (copied); default Kaiming-uniform as nn.Linear.
    dtype, device : of the parameters.

    Attributes
    ----------
    weight, bias : frozen (requires_grad False).
    lora_A : (r, n) Parameter, Gaussian with standard deviation 1/sqrt(n) (as
        ``lorakern.init_adapters``); lora_B : (m, r) Parameter, zeros: BA = 0 at the start.
    scaling : s.

    Raises
    ------
    TypeError, ValueError : sizes that are not positive integers, a non-positive alpha, or
        a weight whose shape is not (out_features, in_features), named.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, *, alpha=None,
                 bias: bool = True, weight=None, dtype=None, device=None):
        in_features = positive_int("in_features", in_features)
        out_features = positive_int("out_features", out_features)
        rank = positive_int("rank", rank)
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, dtype=dtype, device=device)
        if weight is not None:
            weight = torch.as_tensor(weight)
            if tuple(weight.shape) != (out_features, in_features):
                raise ValueError(f"weight must be (out_features, in_features) = "
                                 f"({out_features}, {in_features}), got shape "
                                 f"{tuple(weight.shape)}")
            with torch.no_grad():
                base.weight.copy_(weight)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)
        self.bias = (nn.Parameter(base.bias.detach().clone(), requires_grad=False)
                     if bias else None)
        self.scaling = (1.0 if alpha is None else positive_float("alpha", alpha) / rank)
        kw = dict(dtype=self.weight.dtype, device=self.weight.device)
        self.lora_A = nn.Parameter(torch.randn(rank, in_features, **kw) / math.sqrt(in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, **kw))

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, *, alpha=None) -> "LoRALinear":
        """A LoRALinear whose frozen weight and bias are copies of ``linear``'s."""
        layer = cls(linear.in_features, linear.out_features, rank, alpha=alpha,
                    bias=linear.bias is not None, weight=linear.weight.detach(),
                    dtype=linear.weight.dtype, device=linear.weight.device)
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
        return layer

    def forward(self, x):
        y = nn.functional.linear(x, self.weight, self.bias)
        return y + self.scaling * nn.functional.linear(nn.functional.linear(x, self.lora_A),
                                                       self.lora_B)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, scaling={self.scaling:g}")


@dataclass
class _Layer:
    """One adapted layer: its module, its (B, A, s) pairs, and what the hooks kept."""

    name: str
    module: nn.Module
    pairs: list                      # (B, A, s): B (m x r) and A (r x n) Parameters
    inputs: list = field(default_factory=list)   # X rows of each forward (N_c x n)
    deltas: list = field(default_factory=list)   # Delta rows of each forward, or None


def lora_layers(model: nn.Module, adapter: str | None = None) -> list[tuple[str, nn.Module, list]]:
    """The LoRA layers of ``model``: (name, module, [(B, A, scaling), ...]).

    Parameters
    ----------
    model : the module to search (``named_modules``).
    adapter : a PEFT adapter name, or None for each layer's active adapters.

    Returns
    -------
    One entry per adapted layer: lorakern's ``LoRALinear`` (its ``lora_B``, ``lora_A``,
    ``scaling``) and PEFT's LoRA layers (``lora_B[adapter].weight`` m x r,
    ``lora_A[adapter].weight`` r x n, ``scaling[adapter]``: alpha / r, or alpha / sqrt(r)
    with rsLoRA). Several adapters on one layer are several pairs of one entry.

    Raises
    ------
    ValueError : a layer the theory does not cover (module docstring).
    """
    found = []
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            found.append((name, module, [(module.lora_B, module.lora_A, float(module.scaling))]))
            continue
        if not (hasattr(module, "lora_A") and hasattr(module, "lora_B")
                and hasattr(module, "scaling")):
            continue
        if isinstance(module.lora_A, nn.Parameter):
            continue  # a LoRALinear-like module of someone else's: not a PEFT layer
        pairs = _peft_pairs(name, module, adapter)
        if pairs:
            found.append((name, module, pairs))
    return found


def _peft_pairs(name, module, adapter):
    what = f"layer {name!r} ({type(module).__name__})"
    if len(getattr(module, "lora_embedding_A", {}) or {}):
        raise ValueError(f"{what} adapts an embedding (lora_embedding_A): lorakern's step "
                         f"covers LoRA of linear layers only (G = Delta^T X)")
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else None
    if isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or "Conv" in type(module).__name__ \
            and type(base).__name__ != "Conv1D":
        raise ValueError(f"{what} adapts a convolution: lorakern's step covers LoRA of linear "
                         f"layers only (G = Delta^T X)")
    if isinstance(base, nn.Embedding):
        raise ValueError(f"{what} adapts an embedding: lorakern's step covers LoRA of linear "
                         f"layers only")
    if getattr(module, "merged", False) or getattr(module, "merged_adapters", None):
        raise ValueError(f"{what} has merged adapters: unmerge them (model.unmerge_adapter()) "
                         f"before training")
    active = getattr(module, "active_adapters", None) or list(module.lora_A.keys())
    if isinstance(active, str):
        active = [active]
    names = [a for a in active if a in module.lora_A and (adapter is None or a == adapter)]
    pairs = []
    for a in names:
        if getattr(module, "use_dora", {}).get(a, False):
            raise ValueError(f"{what}, adapter {a!r}: DoRA (use_dora) normalises the weight, "
                             f"so the layer is not W0 + s BA and the paper's step does not apply")
        dropouts = getattr(module, "lora_dropout", None)  # an nn.ModuleDict
        dropout = dropouts[a] if dropouts is not None and a in dropouts else None
        if isinstance(dropout, nn.Dropout) and dropout.p > 0:
            raise ValueError(f"{what}, adapter {a!r}: LoRA dropout p={dropout.p} feeds the "
                             f"adapter another input than the layer's, which the theory does "
                             f"not cover; use lora_dropout=0.0")
        lin_A, lin_B = module.lora_A[a], module.lora_B[a]
        if getattr(lin_A, "bias", None) is not None or getattr(lin_B, "bias", None) is not None:
            raise ValueError(f"{what}, adapter {a!r}: a LoRA bias (lora_bias) is not covered "
                             f"by the theory; use lora_bias=False")
        if not isinstance(lin_A, nn.Linear) or not isinstance(lin_B, nn.Linear):
            raise ValueError(f"{what}, adapter {a!r}: lora_A/lora_B are "
                             f"{type(lin_A).__name__}/{type(lin_B).__name__}, not linear "
                             f"(a convolution?); only LoRA of linear layers is covered")
        pairs.append((lin_B.weight, lin_A.weight, float(module.scaling[a])))
    return pairs


@dataclass
class StepInfo:
    """The numbers of the last step, at the old iterate V'_t (scaling folded in)."""

    eta: float          # the step taken
    eta_theorem: float  # eq. (8)
    g_norm: float       # ||G||_F over all layers (or its bound, norm="bound")
    v_sq: float         # ||V'||^2
    grad_sq: float      # ||grad J(V')||^2
    loss: float | None  # the closure's loss at V_t, if a closure was given
    trials: int         # closure calls of the line search beyond the first


class LoRAStepOptimizer(torch.optim.Optimizer):
    """Gradient descent on all LoRA pairs of a model with eta_t of Mu & Klabjan (2025).

    Parameters
    ----------
    model : an ``nn.Module`` holding PEFT LoRA layers or ``lorakern.torch.LoRALinear``s (see
        the module docstring for what a step computes and how the scaling is folded in).
    lipschitz : the user's L (> 0); eta_t uses max(L, 1). A network's loss has no global L:
        see the module docstring.
    norm : "exact" (||Delta_l^T X_l||_F on the tensors' device; the module docstring says
        which code computes it) or "bound" (a certified upper bound, cheaper; a smaller
        eta_t).
    adapter : the PEFT adapter to train (default: the active ones).
    cap, c, max_trials : the line search of ``step(closure)``, as ``lorakern.Armijo``.

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
                 adapter: str | None = None, cap: float = 1.0, c: float = 1e-4,
                 max_trials: int = 60):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if norm not in ("exact", "bound"):
            raise ValueError(f"norm must be 'exact' or 'bound', got {norm!r}")
        self.lipschitz = positive_float("lipschitz", lipschitz)
        self.norm = norm
        self.armijo = Armijo(cap=cap, c=c, max_trials=max_trials)  # validates them
        found = lora_layers(model, adapter)
        if not found and adapter is not None and lora_layers(model):
            raise ValueError(f"no LoRA layer of {type(model).__name__} has an active adapter "
                             f"named {adapter!r}")
        if not found:
            raise ValueError(f"no LoRA layer found in {type(model).__name__}: wrap its linear "
                             f"layers with peft.get_peft_model(model, LoraConfig(...)) or "
                             f"lorakern.torch.LoRALinear")
        self.layers = [_Layer(name, module, pairs) for name, module, pairs in found]
        params = [p for layer in self.layers for B, A, _ in layer.pairs for p in (B, A)]
        super().__init__(params, dict(lipschitz=self.lipschitz))
        devices = sorted({str(p.device) for p in params})
        self.device = ("mixed" if len(devices) > 1 else
                       "cuda:%d" % params[0].device.index if params[0].is_cuda else devices[0])
        self.last: StepInfo | None = None
        self._capturing = True
        self._eta_prev = None
        self._handles = [layer.module.register_forward_hook(self._hook(layer), with_kwargs=True)
                         for layer in self.layers]

    # -- the hooks: X on the way forward, Delta on the way back ---------------------------------
    def _hook(self, layer: _Layer):
        def forward_hook(module, args, kwargs, output):
            if not (self._capturing and torch.is_grad_enabled() and output.requires_grad):
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

    def remove_hooks(self) -> None:
        """Detach the optimizer from the model (its hooks); it cannot step afterwards."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients and what the hooks kept (X and Delta of the last passes)."""
        super().zero_grad(set_to_none=set_to_none)
        self._clear()

    def _clear(self):
        for layer in self.layers:
            layer.inputs.clear()
            layer.deltas.clear()

    # -- the norms -------------------------------------------------------------------------------
    def _g_sq(self) -> float:
        """sum_l ||Delta_l^T X_l||_F^2 (or the bound's square), float64."""
        total = 0.0
        for layer in self.layers:
            rows = [(x, d) for x, d in zip(layer.inputs, layer.deltas) if d is not None]
            has_grad = any(p.grad is not None for B, A, _ in layer.pairs for p in (B, A))
            if not rows:
                if has_grad and layer.inputs:
                    raise RuntimeError(f"layer {layer.name!r} has gradients but its output's "
                                       f"gradient was not seen; call loss.backward() before step()")
                if has_grad:
                    raise RuntimeError(f"layer {layer.name!r} has gradients but no captured "
                                       f"input: was the forward pass run before the optimizer "
                                       f"was made, or under torch.no_grad()?")
                continue  # the loss does not reach this layer: G_l = 0
            X = torch.cat([x for x, _ in rows]) if len(rows) > 1 else rows[0][0]
            D = torch.cat([d for _, d in rows]) if len(rows) > 1 else rows[0][1]
            total += self._layer_norm_sq(D, X)
        return total

    def _layer_norm_sq(self, D, X) -> float:
        if self.norm == "bound":
            # U = sum_i ||delta_i|| ||x_i|| >= ||sum_i delta_i x_i^T||_F (module docstring)
            U = (D.double().norm(dim=1) * X.double().norm(dim=1)).sum().item()
            return (U * (1.0 + BOUND_MARGIN)) ** 2
        if D.dtype not in (torch.float32, torch.float64):  # bf16/fp16: what Numba/CuPy read
            D = D.float()
        if X.dtype != D.dtype:
            X = X.to(D.dtype)
        N, m = D.shape
        n = X.shape[1]
        # the Gram identity costs N^2 (m + n) / 2 multiply-adds (X X^T is new every step),
        # the tiles of Delta^T X cost N m n: take the cheaper one
        gram = N * (m + n) < 2 * m * n
        if not D.is_cuda and N * m * min(N, n) < TORCH_NORM_WORK:
            # float64 products: each entry of Delta^T X (or of Delta Delta^T and X X^T) is
            # accumulated in float64 from exact products of the float32/float64 inputs
            D64, X64 = D.double(), X.double()
            if gram:
                return float(torch.sum((D64 @ D64.T) * (X64 @ X64.T)))  # <D D^T, X X^T>
            G = D64.T @ X64
            return float(torch.sum(G * G))
        D_arr, X_arr = as_array("Delta", D.contiguous()), as_array("X", X.contiguous())
        if D.is_cuda:
            from ._cuda import linear as cuda_linear

            xp = sys.modules["cupy"]  # as_array read the CUDA tensors with it
            with xp.cuda.Device(D.device.index):
                K = None
                if gram:
                    X64 = X_arr.astype(np.float64)
                    K = X64 @ X64.T
                return float(cuda_linear.delta_x_norm_sq(xp, D_arr, X_arr, K))
        from ._cpu import linear as cpu_linear

        K = None
        if gram:
            X64 = X_arr.astype(np.float64)
            K = X64 @ X64.T
        return float(cpu_linear.delta_x_norm_sq(D_arr, X_arr, K))

    def _norms(self):
        """(||V'||^2, ||grad J(V')||^2), float64, scaling folded in (module docstring)."""
        v_sq = grad_sq = 0.0
        for layer in self.layers:
            for B, A, s in layer.pairs:
                v_sq += s * (_sq(A) + _sq(B))
                grad_sq += (_sq(A.grad) + _sq(B.grad)) / s
        return v_sq, grad_sq

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
        if not self._handles:
            raise RuntimeError("remove_hooks() was called: this optimizer cannot step")
        loss = None
        if closure is not None:
            self._clear()
            with torch.enable_grad():
                loss = closure()
        g_norm = math.sqrt(self._g_sq())
        v_sq, grad_sq = self._norms()
        eta_theorem = float(theorem_eta(v_sq, g_norm, max(self.lipschitz, 1.0)))  # eq. (8)
        grads = [(B, A, s, _grad(B), _grad(A)) for layer in self.layers
                 for B, A, s in layer.pairs]
        old = [(B.detach().clone(), A.detach().clone()) for B, A, *_ in grads]
        eta, trials = eta_theorem, 0
        if closure is not None:
            eta, trials = self._line_search(closure, _item(loss), grads, old, grad_sq,
                                            eta_theorem)
        self._update(grads, old, eta)
        self.last = StepInfo(eta=eta, eta_theorem=eta_theorem, g_norm=g_norm, v_sq=v_sq,
                             grad_sq=grad_sq, loss=None if loss is None else _item(loss),
                             trials=trials)
        self._clear()
        return loss

    @staticmethod
    def _update(grads, old, eta):
        """B = B_t - (eta / s) grad_B, A likewise, all from the old iterate (eq. 3)."""
        for (B, A, s, gB, gA), (B0, A0) in zip(grads, old):
            B.copy_(B0 - gB * (eta / s))
            A.copy_(A0 - gA * (eta / s))

    def _line_search(self, closure, loss0, grads, old, grad_sq, eta_theorem):
        a = self.armijo
        eta = a.cap if self._eta_prev is None else min(a.cap, 2.0 * self._eta_prev)
        trials, accepted = 0, None
        saved = [(B.grad, A.grad) for B, A, *_ in grads]
        self._capturing = False
        try:
            while eta > eta_theorem and trials < a.max_trials:
                trials += 1
                self._update(grads, old, eta)
                with torch.enable_grad():
                    value = _item(closure())
                if value <= loss0 - a.c * eta * grad_sq:
                    accepted = eta
                    break
                eta *= 0.5
        finally:
            self._capturing = True
            for (B, A, *_), (gB, gA) in zip(grads, saved):
                B.grad, A.grad = gB, gA
        if accepted is None:
            accepted = eta_theorem
        self._eta_prev = accepted  # as lorakern.Armijo keeps it
        return accepted, trials


def _item(loss) -> float:
    return float(loss.detach()) if torch.is_tensor(loss) else float(loss)


def _grad(p):
    return torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()


def _sq(t) -> float:
    if t is None:
        return 0.0
    return float(torch.sum(torch.square(t.detach().double())))

