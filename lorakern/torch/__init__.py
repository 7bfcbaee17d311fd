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

    ||G||_F = (sum_l ||Delta_l^T X_l||_F^2)^(1/2)            exact: from G_l where the taps
        kept G_l (see below), else from the kept rows by the Gram identity
        <Delta Delta^T, X X^T> or from Delta^T X, whichever costs fewer multiply-adds. CPU
        float32 (bf16, fp16) rows: one float32 product Delta^T X, its norm raised by the
        product's rounding bound gamma_N sum_i ||delta_i|| ||x_i|| (norms.float32_norm_sq:
        never below the true value, ~1e-3 above it at N = 3328; a half to a third of
        the float64 products' time); CPU float64 rows, and the Gram route, under TORCH_NORM_WORK
        multiply-adds (N m min(N, n)): two float64 torch products on the model's own torch
        threads; larger ones: the linear kind's kernels
        (lorakern._cpu.linear.delta_x_norm_sq: BLAS products, Numba's ordered sums); CUDA
        tensors: CuPy (lorakern._cuda.linear.delta_x_norm_sq)
    eta_t = min{1 / (5 sqrt(2) max(L, 1) (||V'||^2 + ||G||_F)), 1}       (eq. 8)

and updates every A and B at once from the old iterate (eq. 3), eta = lr * eta_t with
``param_groups[0]["lr"]`` (default 1; schedulers write it; lr <= 1 keeps Lemma 2's
decrease, whose proof only bounds eta from above; lr > 1 warns that it voids it).

**What is kept, and for how long** (capture.py). A tap on each adapter's output saves X_l
as autograd saves its own tensors and receives Delta_l in the backward pass: a pass that
gets no backward keeps nothing (X goes with its graph), gradient checkpointing drops and
recomputes X like the rest, and after the backward each layer keeps the fewer numbers of its
rows (X_l, Delta_l) or G_l = sum Delta_l^T X_l itself (m n; gradient accumulation sums into
it), or one float64 with norm="bound" (with the gradients it predicts, r (m + n)). Captures
that no ``step()`` used are dropped once their gradients are zeroed, whoever zeroes them.
The hooks hold the optimizer weakly and go with it; a newer optimizer on the same model
replaces them. Several active PEFT adapters on one layer form one pair of rank r_1 + r_2 +
... (B' = [B'_1 B'_2 ...], A' stacked), with one G_l.

**The gradients applied.** ``step()`` compares ``p.grad`` with the gradients the kept passes
give (grad_B = s Delta^T X A^T, grad_A = s B^T Delta^T X): a common scalar is a loss scale
(a GradScaler's unscale_) or a clip factor (``clip_grad_norm_``), and ||G|| is scaled by it,
so eta is the one of the gradients applied; a mismatch beyond a scalar is stale data, an
error.

**LoRA dropout** is covered exactly. With the step's dropout mask fixed, PEFT's adapter
adds s x~ (B A)^T with x~ the dropped-out input (``lora_A``'s input), a smooth function of
M = BA with dJ/dM = s Delta^T X~; folded as above, G = Delta^T X~: the tap takes X~ in
place of X (an adapter with dropout is a group of its own: its own x~). The certificate is
for that mask: ``step(closure)``'s trials replay the gradient pass's random numbers (torch's
RNG state is restored before each trial and, after the search, set to where the gradient
pass left it), so each trial sees the same dropout masks.

**Data parallel** (distributed.py). Under ``DistributedDataParallel`` (or with
torch.distributed initialised, or ``process_group=``) ||G|| is the global one, G =
(1/W) sum_r Delta_r^T X_r as DDP averages the gradients, reduced by the cheaper of an
all-gather of the rows and an all-reduce of G; eta is the same bits on every rank, and the
line search decides on the loss's mean over ranks. Under FSDP2 (``fully_shard``: B and A
DTensor shards) the same, with norm="exact": the whole pairs are all-gathered for the
gradient check (r (m + n) numbers a layer), ||V'||^2 and ||grad J||^2 are the ranks' shard
sums added in rank order, and each rank updates its own shards. FSDP1
(``FullyShardedDataParallel``) and norm="bound" under FSDP2 are refused.

**The ecosystem's conventions.** ``state_dict()`` carries lr, L and the line search's
state (a resumed run is bitwise the uninterrupted one); ``add_param_group`` is refused;
trainable parameters that are not LoRA adapters (PEFT's ``modules_to_save`` heads) are
refused by name unless handed to a companion optimizer (``others=torch.optim.AdamW``),
stepped, zeroed and state-dicted with this one; ``opt.last`` (``StepInfo``: eta, ||G||,
||V'||^2, the line search's trials) is there for loggers, with torch's step post-hooks.
Under ``torch.compile`` the taps are opaque custom ops (no graph break in the forward) and
``step()`` runs eagerly (one break a step); eager passes tap through a copy-free autograd
Function.

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

**Line search.** ``step(closure)`` calls the closure once for the gradient at V_t, then
searches along -grad J with forward-only trials (``search.py``: each trial calls the same
closure under ``torch.no_grad()`` with its ``loss.backward()`` made a no-op, so an
LBFGS-style closure works unchanged and a trial costs one forward pass). The first trial is
the minimiser of the last step's quadratic model (at most twice the last eta and ``cap``),
a rejected trial is followed by the minimiser of the quadratic through it, and a step is
accepted when J(V' - eta grad) <= J(V') - eta/5 ||grad J(V')||^2 (Armijo with Lemma 2's c =
1/5); once a trial would not exceed eta_t the search takes eta_t. So every step is
certified: eta >= eta_t and the decrease eta/5 ||grad J||^2 on the step's batch. A guard
keeps a trial from growing ||V'||^2 beyond 1.25 times its value (mini-batches). The
trials' gradients and captures are discarded and p.grad is left as it was at V_t.
``line_search="halving"`` runs ``lorakern.Armijo``'s search instead. With ``norm="lazy"``
the search computes ||G|| only if a trial comes down to eq. (8) with ||G|| = 0 (an upper
bound of eta_t: an accepted eta beyond it is >= eta_t whatever ||G|| is), which makes
``step(closure)``'s own cost a few percent of a training step (benchmarks/NOTES.md); under a
process group ``norm="lazy"`` computes the exact norm up front (every rank reduces at the
same point).

Not covered by the theory, and refused with a ValueError: DoRA (``use_dora``: a normalised
weight, not W0 + s BA), adapters on embeddings or convolutions (PEFT's ``lora_embedding_A``,
Conv layers: their gradient is not Delta^T X of one input), a LoRA bias (``lora_bias``: a
trained bias outside the pair (B, A)), merged adapters.

**Floor plan.** One concern a module:

    layers.py       LoRALinear; lora_layers(): which modules are LoRA layers, their (B, A, s)
    capture.py      the taps that keep X_l and Delta_l (or G_l), their memory plan, lifecycle
    norms.py        ||G||_F (exact or bound), ||V'||^2 and ||grad J(V')||^2, one process
    distributed.py  the global ||G|| and loss under DDP and FSDP2; the process group
    search.py       the line search of step(closure): forward-only trials, the first trial
                    from a quadratic model, the ||V'|| guard; no collectives
    optimizer.py    LoRAStepOptimizer: the step, lr, state_dict, the companion optimizer
"""
from __future__ import annotations

try:
    import torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError('lorakern.torch needs PyTorch: pip install ".[torch]" in a clone of '
                      'lorakern, which brings torch and peft') from exc

from .layers import LoRALinear, lora_layers
from .optimizer import LoRAStepOptimizer, StepInfo

__all__ = ["LoRALinear", "LoRAStepOptimizer", "StepInfo", "lora_layers"]
