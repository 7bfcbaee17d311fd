"""The step under data parallelism: the global ||G||, the global loss, one decision.

**Which G.** DDP averages gradients: every rank applies p.grad = (1/W) sum_r grad_r, the
gradient of J = (1/W) sum_r J_r with J_r the rank's own loss (a mean over its rows). So the
step's G is dJ/dW = (1/W) sum_r Delta_r^T X_r, Delta_r the rank's output gradients of its
J_r: with equal local batches, the G of one process on the concatenated batch with the
mean loss. The predicted gradients (capture.py) are averaged the same way, and compared
with the p.grad DDP left.

**How it is reduced, and what it costs** (per step, W ranks, a layer m x n with N rows a
rank, float64 buffers):

- norm="bound": U = (1/W) sum_r U_r is a sum: the layers' U_r ride in the one all-reduce of
  the predicted gradients (r (m + n) + 1 numbers a layer).
- norm="exact": ||G|| is not a sum over ranks. Per layer, the cheaper of
  - an all-gather of the rows (X_r, Delta_r): each rank receives (W - 1) N (m + n) numbers,
    and the norm is then taken locally on the W N stacked rows (Gram or tiles, norms.py);
  - an all-reduce of G_r = Delta_r^T X_r (a rank's own dense G, or its rows folded into one):
    a ring all-reduce moves about 2 (W - 1) / W m n numbers a rank.
  The rows go when W N (m + n) < 2 m n (small batches), else G. One all-gather of the
  layers' row counts (L numbers) makes the choice the same on every rank; the G's and the
  predicted gradients travel in one all-reduce, all rows-route layers in one all-gather.
  Measured (``python benchmarks/torch_distributed.py``: gloo, 2 processes on a shared
  2-core machine, a 768 x 768 layer, r = 8): N = 128 rows a rank gathers the rows (0.75 MiB
  a rank), 12.7 and 22.0 ms in two runs, most of it the float64 Gram norm of the 256 rows;
  N = 2048 all-reduces G (4.5 MiB a rank), 15.6 and 15.3 ms (medians of 20;
  benchmarks/NOTES.md). The route minimises the bytes, what costs between machines.
- Then rank 0's ||G||^2 is broadcast (one float64): eta is the same bits on every rank
  whatever the collectives' rounding.

**The line search** decides on the global loss: the optimizer wraps the loss callable so
that it returns the mean over ranks (one float64 all-reduce a trial); every rank then takes
the same decisions and runs the same trials, so the trials' collectives (DDP's gradient
all-reduce in a closure's backward) pair up and nothing can deadlock.

**FSDP2** (``torch.distributed.fsdp.fully_shard``, composable) is supported with
norm="exact" (and "lazy", exact under a group); tested on the CPU with gloo (2 processes,
tests/test_torch_distributed.py), not on CUDA/NCCL. It makes every
LoRA parameter a DTensor sharded on dim 0 of a 1-D mesh (B's m rows, A's r rows; uneven
shards as torch chunks them) and all-gathers the weights for each forward, so the taps see
whole weights and the rank's own rows: X_r and Delta_r as under DDP, and FSDP's
reduce-scatter averages the gradients as DDP does. The step then differs from DDP's in:

- the predicted gradients need whole pairs: one all-gather of every LoRA parameter's
  shard (``full_pairs``: r (m + n) numbers a layer, in float64); the same G reduction as
  DDP's follows;
- the gradient check (optimizer._grad_scale) compares each rank's shard of p.grad with the
  same rows of the (whole, averaged) prediction; its three sums (dot, pp, gg) and
  ||V'||^2, ||grad J||^2 (the local shards' float64 sums) are summed over the ranks in one
  all-gather of those five numbers, added in rank order on every rank, so they are the
  same bits everywhere (an all-reduce's order need not be); <V', grad J> (the search's
  guard, step(closure)) likewise, one more all-gather;
- the update B' = B - (eta / s) grad_B is elementwise: each rank writes its own shard (the
  DTensor's local tensor, a view of FSDP's storage), then calls ``reshard()`` on the FSDP
  modules: FSDP2 keeps the root's gathered weights after a forward without gradients (a
  line-search trial's, an eval pass's), and the next forward would run on those, stale;
- what it costs beyond DDP: two small all-gathers a step (latency-bound) and DTensor
  dispatch on the clones of B, A and their gradients. Measured (``python
  benchmarks/torch_fsdp.py``: gloo, 2 processes on the shared 2-core machine, opt.step()
  medians of 11 interleaved rounds, two runs): the tests' 64-64-4 MLP (r = 3, 16 rows a
  rank) 6.5 and 7.3 ms against DDP's 4.0 and 4.5 (ratios 1.40 and 1.67, rounds 0.7-3.7);
  768-768-4 (r = 8, 128 rows a rank) 16.3 and 15.5 ms against 12.9 and 13.1 (1.21 and
  1.16, rounds 1.01-1.74).

Refused, with a ValueError at construction: norm="bound" under FSDP2 (its taps predict the
gradients in the backward pass, when the record holds only shards: a lookup of the
gathered weights there is not done); FSDP1 (``FullyShardedDataParallel``: its flat
parameters pack B and A into one sharded buffer; use FSDP2 or DDP); DTensor LoRA
parameters of any other layout (HSDP's 2-D mesh, tensor parallelism). A rank's shard whose
p.grad is all zero while other ranks' are not reads, at the next forward, as "gradients
zeroed" on that rank alone (capture.py's stale-capture rule is per rank): with real data
this does not happen, but it is not guarded.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import norms
from .capture import acc_dtype, local  # noqa: F401 (local: distributed.local)


def resolve_group(model: nn.Module, process_group, params=()):
    """The process group the step reduces over, or None (one process).

    "auto": a ``DistributedDataParallel`` model's group; FSDP2's (``fully_shard``) the LoRA
    parameters' mesh's group; else the default group when torch.distributed is initialised
    with more than one rank; else None. None: no reduction. A ``ProcessGroup``: that one.
    ``params``: the LoRA parameters (FSDP2's DTensor shards are checked here).
    """
    _refuse_fsdp1(model)
    mesh = shard_mesh(params)
    if isinstance(process_group, str):
        if process_group != "auto":
            raise ValueError(f"process_group must be 'auto', None or a ProcessGroup, got "
                             f"{process_group!r}")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            process_group = model.process_group
        elif mesh is not None:
            process_group = mesh.get_group()
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            process_group = torch.distributed.group.WORLD
        else:
            return None
    if process_group is None:
        if mesh is not None and mesh.size() > 1:
            raise ValueError("process_group=None with FSDP2-sharded LoRA parameters: the "
                             "step needs the shards' group (leave process_group='auto')")
        return None
    if torch.distributed.get_world_size(process_group) == 1:
        return None
    return process_group


def _refuse_fsdp1(model: nn.Module) -> None:
    """FSDP1 (the ``FullyShardedDataParallel`` wrapper) is refused, with its reason."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed
        return
    if any(isinstance(module, FullyShardedDataParallel) for module in model.modules()):
        raise ValueError("lorakern.torch.LoRAStepOptimizer does not run under FSDP1 "
                         "(FullyShardedDataParallel): it shards each LoRA pair's B and A "
                         "into flat parameters, and the step reads whole pairs; use FSDP2 "
                         "(torch.distributed.fsdp.fully_shard) or DistributedDataParallel "
                         "(lorakern/torch/distributed.py says why)")


def shard_mesh(params):
    """The 1-D device mesh of FSDP2-sharded LoRA parameters (DTensors, Shard(0)), or None
    when none is a DTensor; other layouts (HSDP's 2-D mesh, tensor parallelism, a mix of
    sharded and plain adapters) are refused."""
    dtensors = [p for p in params if _is_dtensor(p)]
    if not dtensors:
        return None
    from torch.distributed.tensor import Shard

    mesh = dtensors[0].device_mesh
    for p in dtensors:
        if (len(dtensors) != len(params) or p.device_mesh != mesh or mesh.ndim != 1
                or tuple(p.placements) != (Shard(0),)):
            raise ValueError(f"LoRA parameters as DTensors on a {p.device_mesh.ndim}-D mesh "
                             f"with placements {tuple(p.placements)}: the step supports "
                             f"FSDP2's layout only (fully_shard on a 1-D mesh, every LoRA "
                             f"parameter sharded on dim 0)")
    return mesh


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" or type(getattr(t, "data", None)).__name__ == "DTensor"


def fsdp_modules(model: nn.Module) -> list:
    """The model's FSDP2 modules (``fully_shard``ed), whose ``reshard()`` the step calls."""
    from torch.distributed.fsdp import FSDPModule

    return [module for module in model.modules() if isinstance(module, FSDPModule)]


def full_pairs(records):
    """Every Record's whole pairs [(B, A, s)] from FSDP2's shards, from one all-gather of
    all the ranks' shards (r (m + n) numbers a layer, carried in float64: exact for every
    float dtype), each rank's block padded to torch.chunk's shard size (Shard(0)'s: rank i
    holds rows [i c, min((i + 1) c, rows)), c = ceil(rows / W)). One all-gather instead of
    a ``full_tensor()`` a parameter: 0.4 against 2.7 ms for 4 parameters (gloo, 2 ranks)."""
    params = [p for rec in records for p in rec.params()]
    mesh = params[0].device_mesh
    world = mesh.size()
    blocks, layout = [], []
    for p in params:
        rows, rest = p.shape[0], math.prod(p.shape[1:])
        chunk = -(-rows // world)
        mine = local(p).detach()
        block = torch.zeros(chunk * rest, dtype=torch.float64, device=mine.device)
        block[:mine.numel()] = mine.reshape(-1)
        blocks.append(block)
        layout.append((rows, rest, chunk))
    flat = torch.cat(blocks)
    gathered = [torch.empty_like(flat) for _ in range(world)]
    torch.distributed.all_gather(gathered, flat, group=mesh.get_group())
    whole, at = [], 0
    for p, (rows, rest, chunk) in zip(params, layout):
        parts = []
        for r in range(world):
            k = max(0, min(chunk, rows - r * chunk))
            parts.append(gathered[r][at:at + k * rest])
        at += chunk * rest
        whole.append(torch.cat(parts).reshape(p.shape).to(p.dtype))
    it = iter(whole)  # rec.params() order: B, A of each pair
    return [[(next(it), next(it), s) for _, _, s in rec.pairs] for rec in records]


def shard_rows(p) -> slice:
    """The rows (dim 0) of the whole parameter that this rank's shard of ``p`` holds."""
    if not _is_dtensor(p):
        return slice(0, p.shape[0])
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return slice(offset[0], offset[0] + shape[0])


def rank_ordered_sum(group, values, device) -> list:
    """The sums over ranks of a few float64 numbers, the same bits on every rank: one
    all-gather, then the ranks' values added in rank order (an all-reduce's order may
    differ between ranks)."""
    if group is None:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    gathered = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(gathered, t, group=group)
    total = gathered[0].clone()
    for other in gathered[1:]:
        total += other
    return total.tolist()


def global_mean(group, value, device) -> float:
    """The mean over the group's ranks of a loss (tensor or number), as a float."""
    v = float(value.detach()) if torch.is_tensor(value) else float(value)
    if group is None:
        return v
    t = torch.tensor([v], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, group=group)
    return float(t[0]) / torch.distributed.get_world_size(group)


def reduce_records(group, records, norm: str, device, pairs=None):
    """(global ||G||^2, the global predicted gradients per Record, the routes) over the group.

    The predicted gradients come back as [[grad_B, grad_A] per pair] per Record (float64,
    averaged over ranks, zeros where no rank saw a pass); the routes say per Record whether
    its rows were gathered ("rows") or its G or U all-reduced ("sum"). ``pairs``: the
    Records' whole pairs (``full_pairs``) under FSDP2, else None.
    """
    dist = torch.distributed
    world = dist.get_world_size(group)
    f64 = dict(dtype=torch.float64, device=device)
    route = ["sum"] * len(records)   # "sum": U or G all-reduced; "rows": rows all-gathered
    counts_all = None
    if norm == "exact":
        counts = torch.tensor([-1.0 if rec.dense is not None else float(rec.n_rows)
                               for rec in records], **f64)
        gathered = [torch.empty_like(counts) for _ in range(world)]
        dist.all_gather(gathered, counts, group=group)
        counts_all = torch.stack(gathered)                    # world x records
        for i, rec in enumerate(records):
            m, n = rec.shape
            column = counts_all[:, i]
            if bool((column >= 0).all()) and world * float(column.max()) * (m + n) < 2 * m * n:
                route[i] = "rows"
    # one all-reduce: every Record's predicted gradients, then its U or G (sum route)
    pieces = []
    for j, (rec, how) in enumerate(zip(records, route)):
        pred_rec = rec.predicted(None if pairs is None else pairs[j])
        for (B, A, _), pred in zip(rec.pairs, pred_rec or [None] * len(rec.pairs)):
            pieces += ([pred[0].double().reshape(-1), pred[1].double().reshape(-1)] if pred
                       else [torch.zeros(B.numel(), **f64), torch.zeros(A.numel(), **f64)])
        if norm == "bound":
            pieces.append(torch.tensor([float(rec.bound)], **f64))
        elif how == "sum":  # G, then its float32 rounding bound (0 for float64 or rows)
            pieces += [_dense(rec).reshape(-1), torch.tensor([rec.dense_margin()], **f64)]
    flat = torch.cat(pieces)
    dist.all_reduce(flat, group=group)
    flat /= world
    g_sq, preds, at = 0.0, [], 0
    for rec, how in zip(records, route):
        pred = []
        for B, A, _ in rec.pairs:
            pB = flat[at:at + B.numel()].reshape(B.shape)
            at += B.numel()
            pA = flat[at:at + A.numel()].reshape(A.shape)
            at += A.numel()
            pred.append([pB, pA])
        preds.append(pred)
        if norm == "bound":
            g_sq += (rec.scale * float(flat[at]) * (1.0 + norms.BOUND_MARGIN)) ** 2
            at += 1
        elif how == "sum":  # ||mean G|| raised by the mean of the ranks' rounding bounds
            m, n = rec.shape
            value = math.sqrt(norms.sq(flat[at:at + m * n])) * (1.0 + 2.0 ** -40)
            g_sq += (rec.scale * (value + float(flat[at + m * n]))) ** 2
            at += m * n + 1
    rows_records = [i for i, how in enumerate(route) if how == "rows"]
    if rows_records:
        g_sq += _gathered_rows_g_sq(group, world, [records[i] for i in rows_records],
                                    counts_all[:, rows_records], device)
    result = torch.tensor([g_sq], **f64)
    dist.broadcast(result, src=dist.get_global_rank(group, 0), group=group)
    return float(result[0]), preds, tuple(route)


def _dense(rec) -> torch.Tensor:
    """The Record's G = sum Delta^T X (float64), its rows folded in; zeros if no pass."""
    m, n = rec.shape
    device = rec.pairs[0][0].device
    G = torch.zeros(m, n, dtype=torch.float64, device=device)
    if rec.dense is not None:
        G += rec.dense.double()
    for X, D in rec.rows:
        G.addmm_(D.double().T, X.double())
    return G


def _gathered_rows_g_sq(group, world, records, counts, device) -> float:
    """sum over the Records of ||scale (1/W) Delta_all^T X_all||^2 from one all-gather of
    every rank's rows, each Record's block padded to the largest rank's row count."""
    sizes = [int(counts[:, j].max()) for j in range(len(records))]
    dtype = acc_dtype(*[p for rec in records for p in rec.params()])
    blocks = []
    for rec, size in zip(records, sizes):
        m, n = rec.shape
        block = torch.zeros(size, n + m, dtype=dtype, device=device)
        rows = rec.stacked_rows()
        if rows is not None:
            X, D = rows
            block[:X.shape[0], :n] = X
            block[:X.shape[0], n:] = D
        blocks.append(block.reshape(-1))
    flat = torch.cat(blocks)
    gathered = [torch.empty_like(flat) for _ in range(world)]
    torch.distributed.all_gather(gathered, flat, group=group)
    total, at = 0.0, 0
    for j, (rec, size) in enumerate(zip(records, sizes)):
        m, n = rec.shape
        Xs, Ds = [], []
        for r in range(world):
            block = gathered[r][at:at + size * (n + m)].reshape(size, n + m)
            k = int(counts[r, j])
            Xs.append(block[:k, :n])
            Ds.append(block[:k, n:])
        at += size * (n + m)
        X, D = torch.cat(Xs), torch.cat(Ds)
        if X.shape[0]:
            total += (rec.scale / world) ** 2 * norms.layer_norm_sq(D, X, "exact")
    return total
