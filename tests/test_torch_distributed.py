"""lorakern.torch under DistributedDataParallel: real torch.distributed, gloo, 2 processes.

One spawn runs every scenario (a spawn costs seconds), with lorakern's LoRALinear and with a
PEFT model (their taps differ: capture.py): the global ||G|| against one process
on the concatenated batch, eta the same bits on both ranks, replicas the same bits after
several steps, and step(closure) with a large cap (the ranks' local losses differ, so only a
decision on the global loss keeps their trials, and DDP's all-reduces, paired); the same
under FSDP2 (fully_shard: B and A sharded), where FSDP1 and norm="bound" are refused.
"""
from __future__ import annotations

import copy
import datetime
import os
import socket

import pytest

torch = pytest.importorskip("torch", reason="lorakern.torch needs torch: pip install '.[torch]'")
dist = pytest.importorskip("torch.distributed")

from lorakern.torch import LoRALinear, LoRAStepOptimizer  # noqa: E402
from torch_models import MLP  # noqa: E402

nn = torch.nn
WORLD = 2
ROWS = 16          # rows a rank; the full batch is WORLD * ROWS
STEPS = 4


def _net():
    """fc1 64 -> 64 (its rows travel: W N (m + n) < 2 m n), fc2 64 -> 4 (its G travels)."""
    return MLP(n=64, hidden=64, m=4, dtype=torch.float32)


def _model():
    """lorakern's LoRALinear layers (its taps: the layer's input and output)."""
    torch.manual_seed(0)
    model = _net()
    model.fc1 = LoRALinear.from_linear(model.fc1, 3, alpha=6)
    model.fc2 = LoRALinear.from_linear(model.fc2, 3, alpha=6)
    with torch.no_grad():
        model.fc1.lora_B.normal_(0.0, 0.3)
        model.fc2.lora_B.normal_(0.0, 0.3)
    return model


def _peft_model():
    """PEFT's LoRA on both layers (its taps: lora_A's input, lora_B's output)."""
    import peft

    torch.manual_seed(0)
    model = peft.get_peft_model(_net(), peft.LoraConfig(r=3, lora_alpha=6,
                                                        target_modules=["fc1", "fc2"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    return model


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(WORLD * ROWS, 64, generator=g), torch.randn(WORLD * ROWS, 4, generator=g)


def _loss(model, x, y):
    return torch.mean((model(x) - y) ** 2)


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        X, Y = _data()
        mine = slice(rank * ROWS, (rank + 1) * ROWS)
        result = {}
        for key, make, norm in (("exact", _model, "exact"), ("bound", _model, "bound"),
                                ("peft", _peft_model, "exact")):
            base = make()
            reference = copy.deepcopy(base)              # one process, the whole batch
            ref_opt = LoRAStepOptimizer(reference, norm=norm, process_group=None)
            ddp = nn.parallel.DistributedDataParallel(base)
            opt = LoRAStepOptimizer(ddp, norm=norm)
            assert opt.process_group is ddp.process_group
            info, ref_info = [], []
            for _ in range(STEPS):
                opt.zero_grad()
                _loss(ddp, X[mine], Y[mine]).backward()
                opt.step()
                info.append((opt.last.g_norm, opt.last.eta))
                ref_opt.zero_grad()
                _loss(reference, X, Y).backward()
                ref_opt.step()
                ref_info.append((ref_opt.last.g_norm, ref_opt.last.eta))
            result[key] = dict(info=info, ref=ref_info, params=_flat(base),
                                ref_params=_flat(reference),
                                routes=opt.last.reduction)
        # step(closure) with a large cap: the trials of both ranks must pair up
        base = _model()
        ddp = nn.parallel.DistributedDataParallel(base)
        opt = LoRAStepOptimizer(ddp, cap=1000.0)

        def closure():
            opt.zero_grad()
            loss = _loss(ddp, X[mine], Y[mine])
            loss.backward()
            return loss

        trials = []
        for _ in range(3):
            opt.step(closure)
            trials.append((opt.last.trials, opt.last.eta, opt.last.loss))
        result["closure"] = dict(trials=trials, params=_flat(base),
                                 full_loss=float(_loss(base, X, Y)))
        result.update(_fsdp_scenarios(rank, X, Y, mine))
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _full_flat(model):
    """The trainable parameters of an FSDP2 model, gathered whole (a collective)."""
    return torch.cat([p.full_tensor().reshape(-1) for p in model.parameters()
                      if p.requires_grad])


def _fsdp_scenarios(rank, X, Y, mine):
    """FSDP2 (fully_shard: B and A sharded on dim 0) against one process on the whole batch,
    with step() (fp32, fp64, PEFT) and step(closure); FSDP1 and norm="bound" refused."""
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    result = {}
    for key, make, dtype in (("fsdp", _model, torch.float32), ("fsdp64", _model, torch.float64),
                             ("fsdp_peft", _peft_model, torch.float32)):
        base = make().to(dtype)
        reference = copy.deepcopy(base)
        ref_opt = LoRAStepOptimizer(reference, process_group=None)
        fully_shard(base)
        opt = LoRAStepOptimizer(base)
        info, ref_info = [], []
        for _ in range(STEPS):
            opt.zero_grad()
            _loss(base, X[mine].to(dtype), Y[mine].to(dtype)).backward()
            opt.step()
            info.append((opt.last.g_norm, opt.last.eta, opt.last.v_sq, opt.last.grad_sq))
            ref_opt.zero_grad()
            _loss(reference, X.to(dtype), Y.to(dtype)).backward()
            ref_opt.step()
            ref_info.append((ref_opt.last.g_norm, ref_opt.last.eta, ref_opt.last.v_sq,
                             ref_opt.last.grad_sq))
        result[key] = dict(info=info, ref=ref_info, params=_full_flat(base),
                           ref_params=_flat(reference), routes=opt.last.reduction)
    # step(closure), cap = 1000: the trials' forwards (FSDP's all-gathers) must pair up
    base = _model()
    reference = copy.deepcopy(base)
    fully_shard(base)
    opt = LoRAStepOptimizer(base, cap=1000.0)
    ref_opt = LoRAStepOptimizer(reference, cap=1000.0, process_group=None)

    def closure(model, optimizer, x, y):
        def run():
            optimizer.zero_grad()
            loss = _loss(model, x, y)
            loss.backward()
            return loss
        return run

    trials, ref_trials = [], []
    for _ in range(3):
        opt.step(closure(base, opt, X[mine], Y[mine]))
        trials.append((opt.last.trials, opt.last.eta, opt.last.loss))
        ref_opt.step(closure(reference, ref_opt, X, Y))
        ref_trials.append((ref_opt.last.trials, ref_opt.last.eta, ref_opt.last.loss))
    result["fsdp_closure"] = dict(trials=trials, ref_trials=ref_trials, params=_full_flat(base),
                                  ref_params=_flat(reference))
    # refused: norm="bound" under FSDP2, and FSDP1
    result["fsdp_refused"] = []
    for wrap, kwargs in ((fully_shard, dict(norm="bound")),
                         (lambda m: FullyShardedDataParallel(m, device_id=torch.device("cpu"),
                                                             use_orig_params=True), {})):
        try:
            LoRAStepOptimizer(wrap(_model()), **kwargs)
            result["fsdp_refused"].append("accepted")
        except ValueError as exc:
            result["fsdp_refused"].append(str(exc))
    return result


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    torch.multiprocessing.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("norm", ["exact", "bound", "peft"])
def test_ddp_norm_is_the_global_one(ranks, norm):
    """||G|| under DDP = one process on the concatenated batch (rel 1e-5, fp32), every step;
    the trajectories agree to float32 rounding."""
    for r in ranks:
        for (g, eta), (g_ref, eta_ref) in zip(r[norm]["info"], r[norm]["ref"]):
            assert abs(g - g_ref) <= 1e-5 * g_ref, (g, g_ref)
            assert abs(eta - eta_ref) <= 1e-5 * eta_ref
        assert torch.allclose(r[norm]["params"], r[norm]["ref_params"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("norm", ["exact", "bound", "peft"])
def test_ddp_eta_and_replicas_are_the_same_bits(ranks, norm):
    """eta bitwise equal on both ranks at every step; the replicas bitwise equal after them
    (the ranks' local batches differ: their local ||G|| would not be)."""
    a, b = (r[norm] for r in ranks)
    assert a["info"] == b["info"]
    assert torch.equal(a["params"], b["params"])


def test_ddp_routes_cover_both_reductions(ranks):
    """fc1's rows are gathered, fc2's G is all-reduced (distributed.py): both ran above."""
    assert ranks[0]["exact"]["routes"] == ("rows", "sum")
    assert ranks[0]["bound"]["routes"] == ("sum", "sum")


@pytest.mark.parametrize("key", ["fsdp", "fsdp64", "fsdp_peft"])
def test_fsdp2_norm_is_the_global_one(ranks, key):
    """FSDP2 (B and A sharded): ||G||, eta, ||V'||^2 and ||grad J||^2 = one process on the
    concatenated batch (rel 1e-5 fp32, 1e-12 fp64) at every step; the gathered parameters
    follow its trajectory."""
    rel = 1e-12 if key == "fsdp64" else 1e-5
    for r in ranks:
        for got, want in zip(r[key]["info"], r[key]["ref"]):
            for g, g_ref in zip(got, want):
                assert abs(g - g_ref) <= rel * abs(g_ref), (key, got, want)
        tol = dict(rtol=1e-12, atol=1e-14) if key == "fsdp64" else dict(rtol=1e-4, atol=1e-6)
        assert torch.allclose(r[key]["params"], r[key]["ref_params"], **tol)


@pytest.mark.parametrize("key", ["fsdp", "fsdp64", "fsdp_peft"])
def test_fsdp2_eta_and_replicas_are_the_same_bits(ranks, key):
    """||G||, eta, ||V'||^2, ||grad J||^2 bitwise equal on both ranks at every step (each
    rank holds other rows of B and A and other rows of the batch); the whole parameters
    gathered the same bits."""
    a, b = (r[key] for r in ranks)
    assert a["info"] == b["info"]
    assert torch.equal(a["params"], b["params"])
    assert a["routes"] == ("rows", "sum")


def test_fsdp2_line_search_decides_on_the_global_loss(ranks):
    """step(closure) at cap = 1000 under FSDP2: the same trials on both ranks (the trials'
    all-gathers pair up), the trials and etas of one process on the whole batch (the mean
    loss over equal halves is the whole batch's mean), the same parameters."""
    a, b = (r["fsdp_closure"] for r in ranks)
    assert a["trials"] == b["trials"]
    assert torch.equal(a["params"], b["params"])
    assert max(t for t, _, _ in a["trials"]) > 0
    for (t, eta, loss), (t_ref, eta_ref, loss_ref) in zip(a["trials"], a["ref_trials"]):
        assert t == t_ref
        assert abs(eta - eta_ref) <= 1e-5 * eta_ref and abs(loss - loss_ref) <= 1e-5 * loss_ref
    assert torch.allclose(a["params"], a["ref_params"], rtol=1e-4, atol=1e-6)


def test_fsdp1_and_bound_under_fsdp2_are_refused_with_their_reason(ranks):
    bound, fsdp1 = ranks[0]["fsdp_refused"]
    assert "norm='bound' under FSDP2" in bound
    assert "does not run under FSDP1" in fsdp1 and "flat parameters" in fsdp1


def test_ddp_line_search_decides_on_the_global_loss(ranks):
    """Same trials and etas on both ranks (no deadlock at cap = 1000), the same replicas,
    and the search moved past eta_t (trials > 0) and lowered the global loss."""
    a, b = (r["closure"] for r in ranks)
    assert a["trials"] == b["trials"]
    assert torch.equal(a["params"], b["params"])
    assert max(t for t, _, _ in a["trials"]) > 0
    assert a["full_loss"] < a["trials"][0][2]
