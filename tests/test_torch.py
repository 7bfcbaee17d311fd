"""lorakern.torch: the paper's step for the LoRA layers of a PyTorch model.

Its trajectory on one linear layer against ``lorakern.fit(LinearProblem)``; on a 2-layer MLP
(PEFT adapters where peft is installed, lorakern's LoRALinear always) its gradients and
||G|| against G formed plainly by autograd; what it refuses. Skipped without torch.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="lorakern.torch needs torch: pip install '.[torch]'")

import lorakern  # noqa: E402
from lorakern import _cpu  # noqa: E402,F401
from lorakern.testing import assert_close, random_linear_data  # noqa: E402
from lorakern.torch import LoRALinear, LoRAStepOptimizer  # noqa: E402
from torch_models import MLP, cuda_ready  # noqa: E402

nn = torch.nn
DTYPES = (np.float32, np.float64)
TORCH = {np.float32: torch.float32, np.float64: torch.float64}


def _peft():
    try:
        import peft
    except ImportError:
        return None
    return peft


# ---- one linear layer: the trajectory of lorakern.fit(LinearProblem) ---------------------------
def _layer_case(dtype, N, scaling, seed=0, n=9, m=6, r=3):
    rng = np.random.default_rng(seed)
    X, Y, W0 = random_linear_data(rng, N, n, m, dtype)
    B0 = (rng.standard_normal((m, r)) / 2).astype(dtype)
    A0 = (rng.standard_normal((r, n)) / 2).astype(dtype)
    layer = LoRALinear(n, m, r, alpha=scaling * r, bias=False, weight=torch.from_numpy(W0),
                       dtype=TORCH[dtype])
    with torch.no_grad():
        layer.lora_B.copy_(torch.from_numpy(B0))
        layer.lora_A.copy_(torch.from_numpy(A0))
    tX, tY = torch.from_numpy(X), torch.from_numpy(Y)

    def loss_fn():  # LinearProblem's squared loss: the mean over N of 1/2 ||z - y||^2
        return 0.5 * torch.sum((layer(tX) - tY) ** 2) / N

    return X, Y, W0, B0, A0, layer, loss_fn


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", [4, 40], ids=["gram", "tiles"])
@pytest.mark.parametrize("scaling", [1.0, 2.5])
def test_trajectory_equals_fit_of_linear_problem(dtype, N, scaling):
    """T steps of the optimizer = lorakern.fit on LinearProblem from (sqrt(s) B0, sqrt(s) A0),
    the scaling folded in as the module docstring says; the same eta at every step."""
    X, Y, W0, B0, A0, layer, loss_fn = _layer_case(dtype, N, scaling)
    L, T = 3.0, 6
    opt = LoRAStepOptimizer(layer, lipschitz=L)
    assert opt.device == "cpu"
    etas = []
    for _ in range(T):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
        etas.append(opt.last.eta)
    root = math.sqrt(scaling)
    fit = lorakern.fit(lorakern.LinearProblem(X, Y, W0, lipschitz=L),
                       (root * B0).astype(dtype), (root * A0).astype(dtype), steps=T, device="cpu",
                       step_size="theorem")
    factor = 1.0 if dtype == np.float64 else 10.0  # T steps of fp32 autograd against the sweep
    assert_close(np.array(etas), fit.history.eta, dtype, "eta", factor)
    assert_close(root * layer.lora_B.detach().numpy(), fit.B, dtype, "B", factor)
    assert_close(root * layer.lora_A.detach().numpy(), fit.A, dtype, "A", factor)
    # the step did move: the test could fail
    assert np.abs(layer.lora_B.detach().numpy() - B0).max() > 1e-3


def test_first_step_numbers_equal_lorakern_step():
    """g_norm, v_sq, grad_sq and eta of the first step against lorakern.step's (fp64)."""
    X, Y, W0, B0, A0, layer, loss_fn = _layer_case(np.float64, 40, 1.0, seed=1)
    opt = LoRAStepOptimizer(layer, lipschitz=2.0)
    loss_fn().backward()
    opt.step()
    want = lorakern.step(lorakern.LinearProblem(X, Y, W0, lipschitz=2.0), B0, A0, device="cpu",
                         step_size="theorem")
    for name in ("g_norm", "v_sq", "grad_sq", "eta"):
        assert_close(getattr(opt.last, name), getattr(want, name), np.float64, name)


def test_line_search_equals_armijo_fit():
    """step(closure) with line_search="halving" runs lorakern.Armijo's search: the same etas
    and trials as fit(Armijo) (the default search is tests/test_torch_search.py's)."""
    X, Y, W0, B0, A0, layer, loss_fn = _layer_case(np.float64, 40, 1.0, seed=2)
    opt = LoRAStepOptimizer(layer, lipschitz=1.0, line_search="halving", c=1e-4, max_trials=60)

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    etas, trials = [], []
    for _ in range(5):
        opt.step(closure)
        etas.append(opt.last.eta)
        trials.append(opt.last.trials)
    fit = lorakern.fit(lorakern.LinearProblem(X, Y, W0, lipschitz=1.0), B0, A0, steps=5,
                       device="cpu", step_size=lorakern.Armijo())
    assert trials == list(fit.history.trials) and max(trials) > 0
    assert_close(np.array(etas), fit.history.eta, np.float64, "eta")
    assert max(etas) > fit.history.eta.min()  # the search found more than eta_t somewhere
    assert_close(layer.lora_B.detach().numpy(), fit.B, np.float64, "B")


# ---- a 2-layer MLP: gradients and ||G|| against autograd ----------------------------------------
def _mlp(kind, rslora=False):
    torch.manual_seed(0)
    if kind == "peft":
        peft = _peft()
        if peft is None:
            pytest.skip("peft is not installed (pip install '.[torch]')")
        model = peft.get_peft_model(MLP(), peft.LoraConfig(
            r=2, lora_alpha=6, target_modules=["fc1", "fc2"], lora_dropout=0.0,
            use_rslora=rslora))
        layers = [model.base_model.model.fc1, model.base_model.model.fc2]
        pairs = [(lay.lora_B["default"].weight, lay.lora_A["default"].weight,
                  lay.scaling["default"], lay.base_layer) for lay in layers]
    else:
        model = MLP()
        model.fc1 = LoRALinear.from_linear(model.fc1, 2, alpha=6)
        model.fc2 = LoRALinear.from_linear(model.fc2, 3, alpha=1.5)
        pairs = [(lay.lora_B, lay.lora_A, lay.scaling, lay) for lay in (model.fc1, model.fc2)]
    with torch.no_grad():  # B = 0 at LoRA's start; make both layers' pairs non-trivial
        for B, A, _, _ in pairs:
            B.normal_(0.0, 0.5)
    return model, pairs


def _plain_G(pairs, x, y):
    """G_l = dloss/dW_l formed plainly: each layer's weight W0 + s BA as one leaf tensor."""
    Ws = [(base.weight.detach() + s * B.detach() @ A.detach()).requires_grad_(True)
          for B, A, s, base in pairs]
    bs = [base.bias.detach() for _, _, _, base in pairs]
    h = torch.tanh(x @ Ws[0].T + bs[0])
    loss = torch.mean((h @ Ws[1].T + bs[1] - y) ** 2)
    return torch.autograd.grad(loss, Ws)


@pytest.mark.parametrize("kind, rslora", [("peft", False), ("peft", True), ("lorakern", False)])
@pytest.mark.parametrize("norm, route", [("exact", "torch"), ("exact", "dense"),
                                         ("exact", "kernels"), ("bound", "torch")])
def test_mlp_gradients_and_norm_against_autograd(kind, rslora, norm, route, monkeypatch):
    """route "dense": the taps keep G = Delta^T X (capture.py's memory plan: the 15 rows
    are more numbers than G); "torch": the rows kept (keep_rows patched) and these small
    layers' exact norms are float64 torch products, lorakern's CPU norm kernels not called;
    "kernels": the rows kept and TORCH_NORM_WORK patched to 0, so that each layer's norm runs
    in lorakern._cpu.linear.delta_x_norm_sq, as large layers' do."""
    if route != "dense":
        monkeypatch.setattr(lorakern.torch.capture, "keep_rows", lambda *shape: True)
    if route == "kernels":
        monkeypatch.setattr(lorakern.torch.norms, "TORCH_NORM_WORK", 0)
    model, pairs = _mlp(kind, rslora)
    calls = []
    real = _cpu.linear.delta_x_norm_sq

    def counted(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(_cpu.linear, "delta_x_norm_sq", counted)
    opt = LoRAStepOptimizer(model, lipschitz=1.0, norm=norm)
    assert opt.device == "cpu" and len(opt.layers) == 2
    x = torch.randn(3, 5, 7, dtype=torch.float64)   # tokens: flattened to N = 15 rows
    y = torch.randn(3, 5, 4, dtype=torch.float64)
    loss = torch.mean((model(x) - y) ** 2)
    loss.backward()
    Gs = _plain_G(pairs, x, y)
    old = [(B.detach().clone(), A.detach().clone(), B.grad.clone(), A.grad.clone())
           for B, A, _, _ in pairs]
    opt.step()
    info = opt.last
    for (B, A, s, _), G, (B0, A0, gB, gA) in zip(pairs, Gs, old):
        assert_close(gB.numpy(), (s * G @ A0.T).numpy(), np.float64, "grad_B = s G A^T")
        assert_close(gA.numpy(), (s * B0.T @ G).numpy(), np.float64, "grad_A = s B^T G")
    g_norm = math.sqrt(sum(float(torch.sum(G ** 2)) for G in Gs))
    v_sq = sum(s * float(torch.sum(B0 ** 2) + torch.sum(A0 ** 2))
               for (_, _, s, _), (B0, A0, _, _) in zip(pairs, old))
    grad_sq = sum((float(torch.sum(gB ** 2)) + float(torch.sum(gA ** 2))) / s
                  for (_, _, s, _), (_, _, gB, gA) in zip(pairs, old))
    assert_close(info.v_sq, v_sq, np.float64, "v_sq")
    assert_close(info.grad_sq, grad_sq, np.float64, "grad_sq")
    if norm == "exact":
        assert_close(info.g_norm, g_norm, np.float64, "||G||")
        # lorakern's CPU norm kernels once per layer, or not at all (torch's products)
        assert calls == ([(15, 11), (15, 4)] if route == "kernels" else [])
    else:
        assert g_norm < info.g_norm  # a certified upper bound (strict: the rows differ)
        assert calls == []
    eta = min(1.0 / (5 * math.sqrt(2) * (v_sq + info.g_norm)), 1.0)
    assert_close(info.eta, eta, np.float64, "eta")
    for (B, A, s, _), (B0, A0, gB, gA) in zip(pairs, old):  # eq. 3, scaling folded in
        assert_close(B.detach().numpy(), (B0 - eta / s * gB).numpy(), np.float64, "B")
        assert_close(A.detach().numpy(), (A0 - eta / s * gA).numpy(), np.float64, "A")


def test_bound_lies_between_the_norm_and_the_frobenius_product(monkeypatch):
    """||Delta^T X|| <= sum_i ||delta_i|| ||x_i|| <= ||Delta||_F ||X||_F on a layer whose
    rows differ (so the bounds are not all equal)."""
    monkeypatch.setattr(lorakern.torch.capture, "keep_rows", lambda *shape: True)
    X, Y, W0, B0, A0, layer, loss_fn = _layer_case(np.float64, 40, 1.0, seed=3)
    exact = LoRAStepOptimizer(layer)
    loss_fn().backward()
    x, D = exact.layers[0].rows[0]   # the tap's rows (kept: keep_rows patched)
    exact.step()
    g = exact.last.g_norm ** 2
    U = math.sqrt(lorakern.torch.norms.layer_norm_sq(D, x, "bound"))
    frob = float(torch.linalg.norm(D) * torch.linalg.norm(x))
    assert math.sqrt(g) < U < frob
    exact.remove_hooks()


def test_gradient_accumulation_sums_the_micro_batches():
    """Two forward/backward passes before step(): ||G|| of the two micro-batches together."""
    X, Y, W0, B0, A0, layer, _ = _layer_case(np.float64, 40, 1.0, seed=4)
    tX, tY = torch.from_numpy(X), torch.from_numpy(Y)
    opt = LoRAStepOptimizer(layer)
    for rows in (slice(0, 25), slice(25, 40)):
        (0.5 * torch.sum((layer(tX[rows]) - tY[rows]) ** 2) / 40).backward()
    opt.step()
    want = lorakern.step(lorakern.LinearProblem(X, Y, W0, lipschitz=1.0), B0, A0, device="cpu",
                         step_size="theorem")
    assert_close(opt.last.g_norm, want.g_norm, np.float64, "||G||")
    assert_close(layer.lora_A.detach().numpy(), want.A, np.float64, "A")


# ---- what the theory does not cover ---------------------------------------------------------------
class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.conv = nn.Conv1d(4, 4, 3)
        self.fc = nn.Linear(4, 2)


@pytest.mark.parametrize("config, words", [
    (dict(target_modules=["fc1"], lora_bias=True), "LoRA bias"),
    (dict(target_modules=["fc1"], use_dora=True), "DoRA"),
    (dict(target_modules=["emb"]), "embedding"),
    (dict(target_modules=["conv"]), "convolution"),
])
def test_refuses_what_the_theory_does_not_cover(config, words):
    peft = _peft()
    if peft is None:
        pytest.skip("peft is not installed (pip install '.[torch]')")
    base = Mixed() if config["target_modules"][0] in ("emb", "conv") else MLP()
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, **config))
    with pytest.raises(ValueError, match=words):
        LoRAStepOptimizer(model)


@pytest.mark.parametrize("make, error, words", [
    (lambda: LoRAStepOptimizer(MLP()), ValueError, "no LoRA layer found"),
    (lambda: LoRAStepOptimizer(LoRALinear(3, 2, 1), norm="fast"), ValueError, "norm must be"),
    (lambda: LoRAStepOptimizer(LoRALinear(3, 2, 1), lipschitz=0.0), ValueError, "lipschitz"),
    (lambda: LoRAStepOptimizer(LoRALinear(3, 2, 1), c=0.5), ValueError, "Armijo c"),
    (lambda: LoRAStepOptimizer([1, 2]), TypeError, "torch.nn.Module"),
    (lambda: LoRALinear(3, 2, 0), ValueError, r"rank must be a positive integer \(>= 1\), got 0"),
    (lambda: LoRALinear(3, 2, 2.5), ValueError, "rank must be a positive integer, got 2.5"),
    (lambda: LoRALinear(3, "2", 1), TypeError, "out_features must be a positive integer"),
    (lambda: LoRALinear(3, 2, 1, alpha=-1.0), ValueError, "alpha must be positive"),
    (lambda: LoRALinear(3, 2, 1, weight=torch.zeros(3, 2)), ValueError,
     r"weight must be \(out_features, in_features\) = \(2, 3\), got shape \(3, 2\)"),
])
def test_bad_arguments(make, error, words):
    with pytest.raises(error, match=words):
        make()


def test_step_without_backward_through_the_hooks_is_an_error():
    layer = LoRALinear(3, 2, 1)
    x = torch.randn(4, 3)
    (layer(x) ** 2).sum().backward()          # before the optimizer exists: nothing captured
    opt = LoRAStepOptimizer(layer)
    with pytest.raises(RuntimeError, match="no captured input"):
        opt.step()


def test_cuda_layers_use_the_cuda_norms():
    if not cuda_ready():
        pytest.skip("needs a CUDA GPU visible to both PyTorch and CuPy")
    X, Y, W0, B0, A0, layer, _ = _layer_case(np.float64, 40, 1.0, seed=5)
    layer = layer.cuda()
    opt = LoRAStepOptimizer(layer)
    assert opt.device == "cuda:0"
    tX, tY = torch.from_numpy(X).cuda(), torch.from_numpy(Y).cuda()
    (0.5 * torch.sum((layer(tX) - tY) ** 2) / 40).backward()
    opt.step()
    want = lorakern.step(lorakern.LinearProblem(X, Y, W0, lipschitz=1.0), B0, A0, device="cpu",
                         step_size="theorem")
    assert_close(opt.last.g_norm, want.g_norm, np.float64, "||G||")
    assert_close(layer.lora_A.detach().cpu().numpy(), want.A, np.float64, "A")


# ---- the example ----------------------------------------------------------------------------------
def test_torch_digits_example_runs(tmp_path):
    """examples/torch_digits.py with tiny settings: every method trains and lowers the loss."""
    pytest.importorskip("sklearn", reason="the example reads scikit-learn's bundled digits")
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "torch_digits.py"
    spec = importlib.util.spec_from_file_location("torch_digits", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    argv = ["--steps", "4", "--pretrain-steps", "20", "--rank", "2",
            "--sgd-rates", "0.3", "--adam-rates", "0.01"]
    plot = None
    try:
        import matplotlib  # noqa: F401
        plot = tmp_path / "curves.png"
        argv += ["--plot", str(plot)]
    except ImportError:
        pass
    threads = torch.get_num_threads()
    try:
        runs = example.main(argv)
    finally:
        torch.set_num_threads(threads)
    assert [r["method"] for r in runs] == ["lorakern", "lorakern+armijo", "sgd", "adam"]
    for r in runs:
        assert len(r["losses"]) == 4 and r["losses"][-1] < r["losses"][0], r["method"]
        assert 0.0 <= r["accuracy"] <= 1.0
    if plot is not None:
        assert plot.stat().st_size > 1000


def test_unknown_adapter_name_is_named():
    """adapter= that no layer has is named, not reported as "no LoRA layer found"."""
    model, _ = _mlp("peft")
    with pytest.raises(ValueError, match="no LoRA layer of .* has an active adapter named 'nope'"):
        LoRAStepOptimizer(model, adapter="nope")
    assert len(LoRAStepOptimizer(model, adapter="default").layers) == 2
