"""lorakern.torch's taps (capture.py): their lifecycle, what they keep, and dropout.

The hooks go with the optimizer and are replaced by a newer one; passes without a backward
keep nothing; captures whose gradients were zeroed by anyone are dropped; gradients that do
not match the kept passes are an error; with LoRA dropout ||G|| equals dJ/dW_a formed plainly
by autograd from the dropped-out inputs; gradient checkpointing gives the same step.
"""
from __future__ import annotations

import gc
import math
import weakref

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="lorakern.torch needs torch: pip install '.[torch]'")

from lorakern.testing import assert_close  # noqa: E402
from lorakern.torch import LoRAStepOptimizer  # noqa: E402
from torch_models import DEVICES, MLP, lora_mlp  # noqa: E402

nn = torch.nn


def _peft_mlp(dropout, seed=0, **config):
    peft = pytest.importorskip("peft", reason="needs peft (pip install '.[torch]')")
    torch.manual_seed(seed)
    model = peft.get_peft_model(MLP(), peft.LoraConfig(
        r=2, lora_alpha=6, target_modules=["fc1", "fc2"], lora_dropout=dropout, **config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    return model


def _batch(seed, rows=12, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, 7, generator=g, dtype=torch.float64).to(device),
            torch.randn(rows, 4, generator=g, dtype=torch.float64).to(device))


def _backward(model, seed):
    x, y = _batch(seed)
    torch.mean((model(x) - y) ** 2).backward()


def _hooks(model):
    return sum(len(m._forward_hooks) for m in model.modules())


# ---- lifecycle -----------------------------------------------------------------------------------
def test_hooks_go_with_the_optimizer():
    """del opt: the optimizer is freed at once (no cycle through the hooks: no wait for the
    garbage collector), its hooks are removed (weakref.finalize), later passes keep nothing."""
    model = lora_mlp()
    opt = LoRAStepOptimizer(model)
    _backward(model, 0)
    opt.step()
    records = opt.layers
    assert _hooks(model) == 2
    ref = weakref.ref(opt)
    gc.disable()
    try:
        del opt
        assert ref() is None and _hooks(model) == 0
    finally:
        gc.enable()
    _backward(model, 1)
    assert all(rec.passes == 0 for rec in records)


def test_a_second_optimizer_replaces_the_first():
    """The second optimizer's hooks replace the first's (not stacked); the first refuses to
    step, naming why; the second steps on its own captures only."""
    model = lora_mlp()
    first = LoRAStepOptimizer(model)
    second = LoRAStepOptimizer(model)
    assert _hooks(model) == 2
    _backward(model, 1)
    assert all(rec.passes == 0 for rec in first.layers)
    assert all(rec.passes == 1 for rec in second.layers)
    with pytest.raises(RuntimeError, match="replaced by a newer LoRAStepOptimizer"):
        first.step()
    second.step()
    for _ in range(3):  # a notebook cell run again: still one set of hooks
        second = LoRAStepOptimizer(model)
    assert _hooks(model) == 2


def test_passes_without_backward_keep_nothing():
    """Forward passes with gradients enabled but no backward (model.eval() evaluation) keep
    nothing: X lives in the pass's graph and goes with it."""
    model = lora_mlp()
    opt = LoRAStepOptimizer(model)
    model.eval()
    for seed in range(5):
        x, _ = _batch(seed)
        out = model(x)
        assert out.requires_grad
    del out
    assert all(rec.passes == 0 and not rec.rows and rec.dense is None for rec in opt.layers)
    model.train()
    _backward(model, 9)
    assert all(rec.passes == 1 for rec in opt.layers)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_model_zero_grad_drops_the_unused_captures(set_to_none):
    """A skipped step, model.zero_grad() (Trainer, Accelerate), then a new batch: ||G|| is the
    new batch's alone, as a fresh optimizer computes it."""
    model = lora_mlp()
    opt = LoRAStepOptimizer(model)
    _backward(model, 1)                        # a step skipped (e.g. an inf under fp16)
    model.zero_grad(set_to_none=set_to_none)
    _backward(model, 2)
    opt.step()
    got = opt.last.g_norm
    fresh = lora_mlp()
    fresh_opt = LoRAStepOptimizer(fresh)
    _backward(fresh, 2)
    fresh_opt.step()
    assert_close(got, fresh_opt.last.g_norm, np.float64, "||G|| of the new batch")
    assert got != 0.0


def test_gradient_accumulation_keeps_both_passes():
    """Two backward passes before step(): G sums them (the same as one pass on both)."""
    model = lora_mlp()
    opt = LoRAStepOptimizer(model)
    x, y = _batch(3, rows=24)
    for rows in (slice(0, 10), slice(10, 24)):
        (torch.sum((model(x[rows]) - y[rows]) ** 2) / 24).backward()
    opt.step()
    fresh = lora_mlp()
    fresh_opt = LoRAStepOptimizer(fresh)
    (torch.sum((fresh(x) - y) ** 2) / 24).backward()
    fresh_opt.step()
    assert_close(opt.last.g_norm, fresh_opt.last.g_norm, np.float64, "||G||")


@pytest.mark.parametrize("norm, rows", [("exact", 2), ("exact", 96), ("bound", 96)],
                         ids=["rows", "float32-G", "bound"])
def test_the_taps_backward_reads_nothing_back_to_the_host(monkeypatch, norm, rows):
    """A tap's backward keeps its sums as device scalars: no float(), item() or bool() of a
    tensor inside the backward (each would be a host sync on CUDA, once per layer per pass),
    on each route (rows kept; a float32 G with its rounding margin; the bound); two passes
    (accumulation), then step() reads them."""
    model = lora_mlp(dtype=torch.float32)
    opt = LoRAStepOptimizer(model, norm=norm)
    x, y = (t.float() for t in _batch(6, rows=rows))
    losses = [torch.sum((model(x[half]) - y[half]) ** 2) / rows
              for half in (slice(0, rows // 2), slice(rows // 2, rows))]

    def host_read(*args, **kwargs):
        raise AssertionError("a tensor was read back to the host inside the backward")
    with monkeypatch.context() as patched:
        for name in ("__float__", "item", "__bool__", "tolist", "__int__"):
            patched.setattr(torch.Tensor, name, host_read)
        for loss in losses:
            loss.backward()
    opt.step()
    assert opt.last.g_norm > 0 and math.isfinite(opt.last.eta)


def test_gradients_that_do_not_match_the_passes_are_an_error():
    """p.grad changed by more than a scalar (here: one layer's gradient doubled, the other
    not) is stale data: an error, not a silent step."""
    model = lora_mlp()
    opt = LoRAStepOptimizer(model)
    _backward(model, 1)
    model.fc1.lora_A.grad *= 2.0
    with pytest.raises(RuntimeError, match="do not match the passes the taps kept"):
        opt.step()


def test_a_scalar_on_the_gradients_is_the_applied_scale():
    """All gradients times 0.25 (what clip_grad_norm_ does): grad_scale 0.25 and ||G|| a
    quarter of the captured one, so eta is the one of the gradients applied."""
    model = lora_mlp()
    opt = LoRAStepOptimizer(model)
    _backward(model, 1)
    for p in model.parameters():
        if p.grad is not None:
            p.grad *= 0.25
    opt.step()
    fresh = lora_mlp()
    fresh_opt = LoRAStepOptimizer(fresh)
    _backward(fresh, 1)
    fresh_opt.step()
    assert_close(opt.last.grad_scale, 0.25, np.float64, "grad_scale")
    assert_close(opt.last.g_norm, 0.25 * fresh_opt.last.g_norm, np.float64, "||G||")


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_step(reentrant):
    """torch.utils.checkpoint around the model: non-reentrant, the taps' X is dropped and
    recomputed like autograd's own saved tensors; reentrant, the first forward runs without
    gradients (no tap) and the recomputation's taps see the backward. Either way the step is
    the plain one's."""
    from torch.utils.checkpoint import checkpoint

    model = lora_mlp()
    opt = LoRAStepOptimizer(model)
    x, y = _batch(4)
    x_in = x.clone().requires_grad_(reentrant)   # reentrant checkpoints need an input with grad
    torch.mean((checkpoint(model, x_in, use_reentrant=reentrant) - y) ** 2).backward()
    opt.step()
    plain = lora_mlp()
    plain_opt = LoRAStepOptimizer(plain)
    _backward(plain, 4)
    plain_opt.step()
    assert opt.last.g_norm == plain_opt.last.g_norm
    assert torch.equal(model.fc1.lora_A, plain.fc1.lora_A)


# ---- the tap's output ------------------------------------------------------------------------------
class _InPlaceMLP(nn.Module):
    """lora_mlp's layers with in-place ops on the tapped outputs: fc1's output scaled and
    ReLU'd in place, fc2's output scaled in place."""

    def __init__(self, lora):
        super().__init__()
        self.fc1, self.fc2 = lora.fc1, lora.fc2

    def forward(self, x):
        h = self.fc1(x)
        h.mul_(1.5)
        nn.functional.relu(h, inplace=True)
        return self.fc2(h).mul_(0.5)


def _effective_G(model, x, y):
    """dJ/dW of each layer's effective weight W0 + s B A (a leaf), the forward pass written out
    (out-of-place): what ||G|| must equal."""
    W = [(lay.weight + lay.scaling * lay.lora_B.detach() @ lay.lora_A.detach()).requires_grad_(True)
         for lay in (model.fc1, model.fc2)]
    h = torch.relu(1.5 * (x @ W[0].T + model.fc1.bias))
    out = 0.5 * (h @ W[1].T + model.fc2.bias)
    return torch.autograd.grad(torch.mean((out - y) ** 2), W)


@pytest.mark.parametrize("device", DEVICES)
def test_in_place_ops_on_a_tapped_output_act_as_without_the_tap(device):
    """The eager tap returns an alias of the adapter's output (no copy): in-place ops on it run
    (a view from a custom Function would refuse them), the gradients are those of the untapped
    model, and ||G|| is that of the forward pass written out. An in-place op that overwrites a
    tensor saved for the backward is refused as it would be without the tap."""
    model = _InPlaceMLP(lora_mlp()).to(device)
    untapped = _InPlaceMLP(lora_mlp()).to(device)
    opt = LoRAStepOptimizer(model)
    x, y = _batch(8, device=device)
    torch.mean((model(x) - y) ** 2).backward()
    torch.mean((untapped(x) - y) ** 2).backward()
    for (name, p), q in zip(model.named_parameters(), untapped.parameters()):
        if p.requires_grad:
            assert torch.equal(p.grad, q.grad), name
    want = math.sqrt(sum(float(torch.sum(G * G)) for G in _effective_G(untapped, x, y)))
    opt.step()
    assert_close(opt.last.g_norm, want, np.float64, "||G|| with in-place ops on the tapped outputs")

    for tapped in (True, False):  # pow saves the tapped output; mul_ then overwrites it
        net = lora_mlp().to(device)
        if tapped:
            LoRAStepOptimizer(net)
        out = net.fc1(x)
        squares = out.pow(2)
        out.mul_(2.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            squares.sum().backward()


def test_eager_passes_do_not_go_through_the_custom_op(monkeypatch):
    """Eager forwards use the copy-free Function; the custom op (which copies the output and
    the gradient) is for torch.compile only."""
    from lorakern.torch import capture

    def refuse(*args):
        raise AssertionError("the custom op ran in an eager pass")
    monkeypatch.setattr(capture, "_tap_op", refuse)
    model = lora_mlp()
    opt = LoRAStepOptimizer(model)
    _backward(model, 3)
    opt.step()
    assert opt.last.g_norm > 0


# ---- dropout -------------------------------------------------------------------------------------
def _plain_G_with_dropout(model, x, y, kept):
    """dJ/dW_a formed plainly: each layer's adapter weight W_a = s B A a leaf, its input the
    dropped-out x~ that the forward pass used (the mask read back from x~: x~ = mask * x /
    (1 - p))."""
    base = model.base_model.model
    layers = [base.fc1, base.fc2]
    W = [(lay.scaling["default"] * lay.lora_B["default"].weight.detach()
          @ lay.lora_A["default"].weight.detach()).requires_grad_(True) for lay in layers]
    masks = [(x_kept != 0).to(x_kept.dtype) / (1.0 - lay.lora_dropout["default"].p)
             for x_kept, lay in zip(kept, layers)]
    h_in = x
    h = h_in @ layers[0].base_layer.weight.T + layers[0].base_layer.bias \
        + (masks[0] * h_in) @ W[0].T
    h = torch.tanh(h)
    out = h @ layers[1].base_layer.weight.T + layers[1].base_layer.bias + (masks[1] * h) @ W[1].T
    loss = torch.mean((out - y) ** 2)
    return torch.autograd.grad(loss, W)


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_norm_equals_autograd_through_the_adapters_input(device):
    """lora_dropout = 0.3 in train mode: ||G|| = (sum_a ||dJ/dW_a||^2)^(1/2) with W_a = s B A
    acting on the dropped-out x~ (capture.py's two-line proof), fp64; the step's predicted
    gradients match autograd's (else step() would raise)."""
    model = _peft_mlp(0.3).to(device)
    opt = LoRAStepOptimizer(model)
    kept = []
    base = model.base_model.model
    handles = [lay.lora_A["default"].register_forward_hook(lambda m, a, o: kept.append(a[0]))
               for lay in (base.fc1, base.fc2)]
    x, y = _batch(5, device=device)
    torch.manual_seed(7)
    loss = torch.mean((model(x) - y) ** 2)
    for h in handles:
        h.remove()
    assert all(bool((k == 0).any()) for k in kept)    # dropout did drop entries
    loss.backward()
    Gs = _plain_G_with_dropout(model, x, y, kept)
    opt.step()
    want = math.sqrt(sum(float(torch.sum(G * G)) for G in Gs))
    assert_close(opt.last.g_norm, want, np.float64, "||G|| with dropout")
    # the layer's own input would give another norm: the test can tell them apart
    no_drop = _peft_mlp(0.0).to(device)
    no_drop_opt = LoRAStepOptimizer(no_drop)
    torch.mean((no_drop(x) - y) ** 2).backward()
    no_drop_opt.step()
    assert abs(no_drop_opt.last.g_norm - want) > 1e-3 * want


def test_dropout_in_eval_mode_is_the_plain_step():
    """model.eval(): dropout is the identity, the step is the p = 0 one."""
    model, plain = _peft_mlp(0.3), _peft_mlp(0.0)
    opts = [LoRAStepOptimizer(m) for m in (model, plain)]
    for m, opt in zip((model, plain), opts):
        m.eval()
        _backward(m, 6)
        opt.step()
    assert_close(opts[0].last.g_norm, opts[1].last.g_norm, np.float64, "||G||")


# ---- torch.compile -------------------------------------------------------------------------------
def test_compiled_forward_has_no_graph_break_and_the_same_step(monkeypatch):
    """Under torch.compile the taps are opaque custom ops (the eager tap's Function is never
    reached: it raises here): a PEFT model's forward traces into one graph (0 breaks,
    torch._dynamo.explain), and the compiled model (AOTAutograd, backend "aot_eager": the
    taps' backward runs inside the compiled backward) gives the eager step's ||G||."""
    if not hasattr(torch.library, "custom_op"):
        pytest.skip("torch < 2.4: the taps are an autograd.Function (eager only)")
    from lorakern.torch import capture

    model = _peft_mlp(0.0)
    opt = LoRAStepOptimizer(model)
    x, y = _batch(8)

    def refuse(*args):
        raise AssertionError("the eager tap ran under torch.compile")
    with monkeypatch.context() as patched:
        patched.setattr(capture._Tap, "apply", refuse)
        explain = torch._dynamo.explain(lambda x: torch.mean((model(x) - y) ** 2))(x)
        assert explain.graph_break_count == 0 and explain.graph_count == 1
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager")
        torch.mean((compiled(x) - y) ** 2).backward()
    opt.step()
    eager = _peft_mlp(0.0)
    eager_opt = LoRAStepOptimizer(eager)
    torch.mean((eager(x) - y) ** 2).backward()
    eager_opt.step()
    assert opt.last.g_norm > 0
    assert_close(opt.last.g_norm, eager_opt.last.g_norm, np.float64, "||G|| compiled")


@pytest.mark.parametrize("dropout_b", [0.0, 0.3])
def test_two_active_adapters_one_group_or_two(dropout_b):
    """Adapters "first" (no dropout) and "second" on fc1, both active: without dropout they
    read one X and form one pair (one G = dJ/dW, the same for both); with dropout on "second"
    it reads its own x~ and is a group of its own: ||G||^2 = ||dJ/dW_1||^2 + ||dJ/dW_2||^2,
    W_1 = s_1 B_1 A_1 on x, W_2 on x~_2, formed plainly by autograd."""
    peft = pytest.importorskip("peft", reason="needs peft (pip install '.[torch]')")
    torch.manual_seed(0)
    model = peft.get_peft_model(MLP(), peft.LoraConfig(r=2, target_modules=["fc1"]),
                                adapter_name="first")
    model.add_adapter("second", peft.LoraConfig(r=3, lora_alpha=6, target_modules=["fc1"],
                                           lora_dropout=dropout_b))
    model.base_model.set_adapter(["first", "second"])
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
            if "lora_B" in name:
                nn.init.normal_(p, 0.0, 0.5)
    opt = LoRAStepOptimizer(model)
    assert [len(rec.pairs) for rec in opt.layers] == ([2] if dropout_b == 0 else [1, 1])
    layer = model.base_model.model.fc1
    kept = {}
    hooks = [layer.lora_A[a].register_forward_hook(
        lambda m, args, out, a=a: kept.__setitem__(a, args[0])) for a in ("first", "second")]
    x, y = _batch(11)
    torch.manual_seed(3)
    loss = torch.mean((model(x) - y) ** 2)
    for h in hooks:
        h.remove()
    W = [(layer.scaling[a] * layer.lora_B[a].weight @ layer.lora_A[a].weight).detach()
         .requires_grad_(True) for a in ("first", "second")]
    base = model.base_model.model
    h = torch.tanh(x @ layer.base_layer.weight.T + layer.base_layer.bias
                   + kept["first"] @ W[0].T + kept["second"] @ W[1].T)
    Ga, Gb = torch.autograd.grad(torch.mean((h @ base.fc2.weight.T + base.fc2.bias - y) ** 2), W)
    loss.backward()
    opt.step()
    if dropout_b == 0:
        assert torch.allclose(Ga, Gb, rtol=0, atol=1e-14)
        want = float(torch.linalg.norm(Ga))
    else:
        want = math.sqrt(float(torch.sum(Ga * Ga) + torch.sum(Gb * Gb)))
    assert_close(opt.last.g_norm, want, np.float64, "||G||")


@pytest.mark.parametrize("seed", range(6))
def test_float32_dense_g_is_never_below_the_exact_norm(seed):
    """A layer whose rows outnumber G's entries keeps G = sum Delta^T X in float32, folded
    pass by pass; ||G|| read from it is raised by its rounding bound, so it is never below the
    float64 value (eta_t never above the true one) and stays within float32 rounding of it."""
    from lorakern.torch import norms
    from lorakern.torch.capture import Record

    g = torch.Generator().manual_seed(seed)
    m, n, r = 5, 7, 2
    B = torch.randn(m, r, generator=g)
    A = torch.randn(r, n, generator=g)
    record = Record("layer", None, [(B, A, 1.0)])
    passes = [(torch.randn(3000, n, generator=g) + 3.0, torch.randn(3000, m, generator=g) + 1.0)
              for _ in range(3)]
    for X, D in passes:
        record.on_backward(X, D)
    assert record.dense is not None and record.dense.dtype == torch.float32
    exact = sum(D.double().T @ X.double() for X, D in passes)
    want = float(torch.sum(exact * exact))
    got = norms.g_sq([record], "exact")
    # the raise: gamma_N U with N = 9000 rows, gamma_N = 5.4e-4 and U ~ ||G|| on these
    # offset rows: ~1.1e-3 on the square; 3e-3 leaves room, a float64-sized slip does not pass
    assert want <= got <= want * (1.0 + 3e-3), (got, want)
