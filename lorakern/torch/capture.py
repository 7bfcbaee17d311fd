"""What the step needs from the forward and backward passes, and the hooks' lifecycle.

``||G_l||_F = ||Delta_l^T X_l||_F`` needs each adapter's input X_l and its output gradient
Delta_l; autograd gives neither to an optimizer. A *tap* collects them.

**The tap.** A forward hook wraps the adapter's output in ``_Tap``, an identity autograd
Function that saves X with ``ctx.save_for_backward``; its backward receives Delta, hands
(X, Delta) to the layer's ``Record`` and passes Delta on unchanged. Its output is an alias of
the adapter's output (``detach()``: the same storage and version counter, not a view), so the
tap copies nothing and an in-place op on it (``nn.ReLU(inplace=True)`` after a ``LoRALinear``)
runs and is checked exactly as on the untapped output. Under ``torch.compile`` the tap is
the custom op ``lorakern::tap`` instead (opaque to the compiler, whose graphs a Function with
a side effect in its backward would break); custom ops cannot alias, so that one copies the
output and the gradient. So:

- a pass that gets no backward keeps nothing: X lives in the pass's graph, freed with it
  (eval-mode forwards with gradients, ``generate()`` under grad, a loss never backpropagated);
- X is a saved tensor like autograd's own (the very tensor ``lora_A``'s weight gradient saves,
  no copy), so gradient checkpointing drops and recomputes it as it does the rest, and it is
  freed as soon as the tap's backward has run;
- what is kept after the backward is only what the step's norm needs (the memory plan below).

**Where X and Delta are taken.** PEFT's layer computes ``result + lora_B(lora_A(dropout(x))) *
s``: X is ``lora_A``'s input x~ (the dropped-out x; x itself when p = 0) and the tap sits on
``lora_B``'s output, whose gradient is s Delta (Delta = d loss / d result); the Record divides
by s once, on the norm. With a dropout mask fixed for the step, the adapter's contribution
is s x~ M^T with M = BA, so d loss / dM = s Delta^T X~ and, in the folded coordinates of the
package docstring, G = Delta^T X~: the step covers dropout exactly with X~ in place of X.
Several active adapters of one layer share one X (and form one pair of rank r_1 + r_2 + ...)
when none has dropout; an adapter with dropout p > 0 has its own x~, so it is its own group
(its own G, a block of the stacked iterate). ``LoRALinear``'s tap is on the layer's output
(s = 1 there: Delta is the output gradient), with X the layer's input.

**Memory plan** (per group, between a backward and ``step()``), N the rows of a pass (tokens
flattened), m x n the layer:

- norm="exact": the rows (X, Delta) while they are fewer numbers than G (sum N (m + n) <=
  m n); past that, G = sum Delta^T X itself (m x n; float32, float64 for float64 inputs), the
  rows folded into it. Either way at most min(N (m + n), m n) numbers; gradient accumulation
  sums into G exactly.
- norm="bound": one float64, U = sum_i ||delta_i|| ||x_i|| (additive over passes).
- and ``step()`` compares ``p.grad`` with the gradients the kept data predicts, grad_B = s
  G A^T and grad_A = s B^T G: from G (O(m n r)) or the rows (O(N r (m + n))); with
  norm="bound" the taps sum them as the passes come (r (m + n) numbers, the work of
  autograd's own LoRA backward).

**Lifecycle.** The hooks close over a ``weakref`` to the ``Capture``, never the optimizer;
``weakref.finalize`` on the optimizer removes them, so ``del opt`` detaches the model. A
second optimizer on the same layers *replaces* the first's hooks (a notebook cell run again
builds the new optimizer before the old one is released; refusing would make that an
error): the old one refuses to step afterwards, naming why. Captures that no ``step()`` used
are dropped when the gradients they belong to have been zeroed, whoever zeroed them
(``opt.zero_grad()``, ``model.zero_grad()``, Trainer, Accelerate): at the next forward pass
through the layer, a group that holds captures whose parameters have no gradient any more
(``None``, or all zero after ``set_to_none=False``) drops them.
"""
from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

#: each tapped module -> weakref to the Capture that owns its hooks (one owner per module)
_OWNERS: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()
#: the live Records by an integer key: what a tap's graph node holds (an int: no reference to
#: the Record, and a constant to torch.compile, which would unwrap a weakref argument)
_RECORDS: "weakref.WeakValueDictionary[int, Record]" = weakref.WeakValueDictionary()
#: the keys: never reused (an id() could be, and a graph alive past its Record would then
#: feed another optimizer's Record)
_KEYS = itertools.count(1)


HALF = (torch.bfloat16, torch.float16)


def local(t):
    """A DTensor's local shard (FSDP2; a view: writing it writes the parameter), any other
    tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def keep_rows(n_rows: int, m: int, n: int) -> bool:
    """Keep the rows (X, Delta) rather than G: they are no more numbers than G's m n."""
    return n_rows * (m + n) <= m * n


def acc_dtype(*tensors) -> torch.dtype:
    """float64 where an input is float64, else float32 (bf16/fp16 are read in float32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


@dataclass
class Record:
    """One group of adapter pairs sharing an input X: its pairs and what its taps kept.

    ``scale`` is 1 / s of the tapped ``lora_B`` (its output gradient is s Delta), 1 for
    ``LoRALinear``; every kept Delta carries that factor, applied once to the norms.
    """

    name: str
    module: nn.Module
    pairs: list                    # (B, A, s): B (m x r), A (r x n) Parameters
    scale: float = 1.0
    norm: str = "exact"
    rows: list = field(default_factory=list)   # (X, Delta) of the passes kept as rows
    n_rows: int = 0
    dense: torch.Tensor | None = None          # sum Delta^T X, m x n
    dense_rows: int = 0                        # rows summed into dense
    dense_u: "float | torch.Tensor" = 0.0     # their sum_i ||delta_i|| ||x_i|| (float32 G)
    bound: "float | torch.Tensor" = 0.0       # sum_i ||delta_i|| ||x_i|| (norm="bound")
    pred: list | None = None                   # [grad_B, grad_A] predicted, per pair
    passes: int = 0                            # backward passes seen since the last clear
    pending: torch.Tensor | None = None        # lora_A's input between its hook and lora_B's
    key: int = 0                               # its key in _RECORDS (set by Capture)
    half: bool = False                         # a pass's X or Delta was bf16/fp16 (autocast)

    @property
    def shape(self):
        B, A, _ = self.pairs[0]
        return B.shape[0], A.shape[1]

    def clear(self) -> None:
        self.rows, self.n_rows, self.dense, self.bound = [], 0, None, 0.0
        self.dense_rows, self.dense_u = 0, 0.0
        self.pred, self.passes, self.pending, self.half = None, 0, None, False

    def params(self):
        return [p for B, A, _ in self.pairs for p in (B, A)]

    def grads_zeroed(self) -> bool:
        """No parameter of the group has a gradient (None, or all zero). Under FSDP2 each
        rank reads its own shard (no collective: the forward hooks call this)."""
        return all(p.grad is None or not bool(local(p.grad).any()) for p in self.params())

    @torch.no_grad()
    def on_backward(self, X, D) -> None:
        """The tap's backward: X (.. x n) and D (.. x m) of one pass, kept per the plan."""
        X = X.detach().reshape(-1, X.shape[-1])
        D = D.detach().reshape(-1, D.shape[-1])
        self.half = self.half or X.dtype in HALF or D.dtype in HALF
        dtype = acc_dtype(X, D, *self.params())
        Xa, Da = X.to(dtype), D.to(dtype)
        self.passes += 1
        if self.norm == "bound":  # no G and no rows are kept: predict the gradients now
            self._add_pred(self._pred_from_rows(Xa, Da))
            # a float64 scalar on the device: no host sync inside the backward (read at step())
            self.bound = self.bound + (D.double().norm(dim=1) * X.double().norm(dim=1)).sum()
            return
        m, n = D.shape[1], X.shape[1]
        if self.dense is None and keep_rows(self.n_rows + X.shape[0], m, n):
            self.rows.append((X, D))
            self.n_rows += X.shape[0]
            return
        if self.dense is None:  # fold the kept rows into G
            self.dense = torch.zeros(m, n, dtype=dtype, device=D.device)
            for x_old, d_old in self.rows:
                self._fold(x_old.to(dtype), d_old.to(dtype))
            self.rows, self.n_rows = [], 0
        self._fold(Xa.to(self.dense.dtype), Da.to(self.dense.dtype))

    def _fold(self, X, D) -> None:
        """G += D^T X; a float32 G also keeps what its rounding bound needs (dense_margin)."""
        self.dense.addmm_(D.T, X)
        self.dense_rows += X.shape[0]
        if self.dense.dtype != torch.float64:
            self.dense_u = self.dense_u + torch.dot(  # on the device, as bound above
                torch.linalg.vector_norm(D, dim=1).double(), torch.linalg.vector_norm(X, dim=1).double())

    def dense_margin(self) -> float:
        """A bound on ||fl(G) - G||_F for the float32 G: each entry is a float32 sum of the
        N products of its row pairs, in whatever order addmm takes them, so |E| <= gamma_N
        |D|^T |X| entrywise and ||E||_F <= gamma_N sum_i ||d_i|| ||x_i|| (as
        norms.float32_norm_sq; the row norms' own float32 rounding is inside the slack of
        gamma_N's 1 / (1 - N u) and the 2^-20 below). 0 for a float64 G."""
        if self.dense is None or self.dense.dtype == torch.float64:
            return 0.0
        u = 2.0 ** -24
        gamma = self.dense_rows * u / (1.0 - self.dense_rows * u)
        return gamma * float(self.dense_u) * (1.0 + 2.0 ** -20)

    def _pred_from_rows(self, X, D, pairs=None):
        """grad_B = s Delta^T X A^T, grad_A = s B^T Delta^T X per pair: O(N r (m + n)).
        ``pairs``: the whole (B, A, s) where the Record's own are FSDP2 shards."""
        out = []
        for B, A, s in pairs or self.pairs:
            k = s * self.scale
            out.append([k * (D.T @ (X @ A.detach().to(X.dtype).T)),
                        k * ((D @ B.detach().to(X.dtype)).T @ X)])
        return out

    def _add_pred(self, preds) -> None:
        if self.pred is None:
            self.pred = preds
            return
        for old, new in zip(self.pred, preds):
            old[0] += new[0]
            old[1] += new[1]

    def predicted(self, pairs=None):
        """The gradients the kept passes give autograd, [[grad_B, grad_A] per pair], or None:
        from G (O(m n r)), from the rows (O(N r (m + n))), or as the taps summed them
        (norm="bound"). Read at step(): B and A are those the passes ran with. ``pairs``:
        the whole (B, A, s) where the Record's own are FSDP2 shards (distributed.py)."""
        if self.pred is not None or self.passes == 0:
            return self.pred
        pairs = pairs or self.pairs
        if self.dense is not None:
            G = self.dense
            return [[s * self.scale * (G @ A.detach().to(G.dtype).T),
                     s * self.scale * (B.detach().to(G.dtype).T @ G)] for B, A, s in pairs]
        X, D = self.stacked_rows()
        dtype = acc_dtype(X, D, *self.params())
        return self._pred_from_rows(X.to(dtype), D.to(dtype), pairs)

    def stacked_rows(self):
        """(X, Delta) of the kept rows, stacked; or None."""
        if not self.rows:
            return None
        if len(self.rows) == 1:
            return self.rows[0]
        return torch.cat([x for x, _ in self.rows]), torch.cat([d for _, d in self.rows])


class _Tap(torch.autograd.Function):
    """Identity on the adapter's output; saves X; its backward gives (X, Delta) to a Record.

    The eager tap (``apply_tap``); under torch.compile, ``lorakern::tap`` below."""

    @staticmethod
    def forward(ctx, output, x, key):
        ctx.save_for_backward(x)
        ctx.key = key
        # an alias, not a view (view_as would make in-place ops on a custom Function's output
        # an error): no copy, and the shared version counter makes an in-place op on it
        # invalidate what the untapped output's producer saved, exactly as without the tap
        return output.detach()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        _give(ctx.key, x, grad)
        return grad, None, None


def _give(key: int, x, grad) -> None:
    record = _RECORDS.get(key)
    if record is not None:
        record.on_backward(x, grad)


try:
    from torch.compiler import is_compiling as _compiling
except ImportError:  # pragma: no cover - torch < 2.3
    from torch._dynamo import is_compiling as _compiling

if hasattr(torch.library, "custom_op"):
    # custom ops are opaque to torch.compile: the tap costs no graph break, and its backward
    # (which has side effects: it fills a Record) runs as the opaque lorakern::tap_grad.
    # Custom ops return new tensors: the output and the gradient are copied (N m numbers,
    # the original output is freed at once: nothing saves it).
    @torch.library.custom_op("lorakern::tap", mutates_args=())
    def _tap_op(output: torch.Tensor, x: torch.Tensor, key: int) -> torch.Tensor:
        return output.clone()

    @_tap_op.register_fake
    def _(output, x, key):
        return torch.empty_like(output)

    @torch.library.custom_op("lorakern::tap_grad", mutates_args=())
    def _tap_grad_op(grad: torch.Tensor, x: torch.Tensor, key: int) -> torch.Tensor:
        _give(key, x, grad)
        return grad.clone()

    @_tap_grad_op.register_fake
    def _(grad, x, key):
        return torch.empty_like(grad)

    def _tap_setup(ctx, inputs, output):
        _, x, key = inputs
        ctx.save_for_backward(x)
        ctx.key = key

    def _tap_backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return _tap_grad_op(grad, x, ctx.key), None, None

    _tap_op.register_autograd(_tap_backward, setup_context=_tap_setup)

    def apply_tap(output, x, key: int):
        # eager: the Function (the custom op's dispatch and copies cost 6-14 % of a small
        # batch's gradient pass: benchmarks/NOTES.md, "the eager tap")
        if _compiling():
            return _tap_op(output, x, key)
        return _Tap.apply(output, x, key)
else:  # pragma: no cover - torch < 2.4
    def apply_tap(output, x, key: int):
        return _Tap.apply(output, x, key)


def _first_tensor(args, kwargs):
    return args[0] if args else next(iter(kwargs.values()))


class Capture:
    """The taps on a list of Records; ``enabled`` off keeps the line search's trials out.

    Holds its Records; the hooks hold only a weakref to it (and to each Record), the taps'
    graph nodes an integer key. ``replaced``: a newer Capture took over its modules.
    """

    def __init__(self, records: list[Record], taps: list[tuple[Record, nn.Module, nn.Module]]):
        self.records = records
        self.enabled = True
        self.replaced = False
        self.handles = []
        me = weakref.ref(self)
        for record, x_module, tap_module in taps:
            for module in {x_module, tap_module}:
                old = _OWNERS.get(module)
                old = old() if old is not None else None
                if old is not None and old is not self and old.attached:
                    old.detach(replaced=True)
                _OWNERS[module] = me
            ref = weakref.ref(record)
            record.key = next(_KEYS)
            _RECORDS[record.key] = record
            if x_module is tap_module:
                self.handles.append(tap_module.register_forward_hook(
                    _tap_hook(me, ref, from_pending=False), with_kwargs=True))
            else:
                self.handles.append(x_module.register_forward_hook(
                    _stash_hook(me, ref), with_kwargs=True))
                self.handles.append(tap_module.register_forward_hook(
                    _tap_hook(me, ref, from_pending=True), with_kwargs=True))

    @property
    def attached(self) -> bool:
        return bool(self.handles)

    def clear(self) -> None:
        for record in self.records:
            record.clear()

    def detach(self, replaced: bool = False) -> None:
        remove_handles(self.handles)
        self.handles = []
        self.replaced = self.replaced or replaced
        self.clear()


def remove_handles(handles) -> None:
    """Remove hook handles (what ``weakref.finalize`` calls; holds no optimizer)."""
    for handle in handles:
        handle.remove()
    handles.clear()


def _active(capture_ref, output) -> "Capture | None":
    capture = capture_ref()
    if capture is None or not capture.enabled or not torch.is_grad_enabled():
        return None
    if not (torch.is_tensor(output) and output.requires_grad):
        return None
    return capture


def _drop_stale(record: Record) -> None:
    """At a new forward pass: captures whose gradients were zeroed since belong to no step."""
    if record.passes and record.grads_zeroed():
        record.clear()


def _stash_hook(capture_ref, record_ref):
    """Forward hook on lora_A: keeps its input x~ until lora_B's hook (the next call)."""

    def stash(module, args, kwargs, output):
        record = record_ref()
        if record is None or _active(capture_ref, output) is None:
            return None
        _drop_stale(record)
        record.pending = _first_tensor(args, kwargs)
        return None

    return stash


def _tap_hook(capture_ref, record_ref, from_pending: bool):
    """Forward hook on lora_B (X from the stash) or on a LoRALinear (X its input)."""

    def tap(module, args, kwargs, output):
        record = record_ref()
        if record is None or _active(capture_ref, output) is None:
            return None
        if from_pending:
            x, record.pending = record.pending, None
            if x is None:
                return None
        else:
            _drop_stale(record)
            x = _first_tensor(args, kwargs)
        return apply_tap(output, x, record.key)

    return tap
