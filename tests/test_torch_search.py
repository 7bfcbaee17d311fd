"""lorakern.torch's line search (search.py) and the speed-minded norms (norms.py).

Forward-only trials (forward and backward passes counted with hooks), the certificate at
every step of a run, the guard on ||V'||^2, the median trials, the state kept across steps
and through state_dict; the float32 norm's certified bound against the float64 value; the
speed example's --quick mode. Skipped without torch.
"""
from __future__ import annotations

import importlib.util
import math
import statistics
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="lorakern.torch needs torch: pip install '.[torch]'")

from lorakern.torch import LoRALinear, LoRAStepOptimizer, norms, search  # noqa: E402
from torch_models import DEVICES  # noqa: E402

nn = torch.nn
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: these layers are tiny, and two OpenMP threads on a busy 2-core
    machine wait on each other at every op (60 steps took 35 s instead of 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class MLP(nn.Module):
    def __init__(self, n=13, hidden=17, classes=5, rank=3):
        super().__init__()
        self.fc1 = LoRALinear(n, hidden, rank, alpha=2.0 * rank)
        self.fc2 = LoRALinear(hidden, classes, rank)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _task(seed=0, rows=96):
    """An MLP with LoRA adapters and labels from a shifted copy of it (learnable by them)."""
    torch.manual_seed(seed)
    model = MLP()
    with torch.no_grad():
        model.fc1.weight.mul_(2.0)
        x = torch.randn(rows, 13)
        model.fc1.lora_B.normal_(0.0, 0.7)
        y = model(x).argmax(1)
        model.fc1.lora_B.zero_()
    return model, x, y


def _closure(opt, model, x, y):
    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


class Counter:
    """Forward passes (a forward hook on the model) and backward passes (a hook on the
    model's output tensor, which autograd calls when a backward pass reaches it)."""

    def __init__(self, model):
        self.forward = self.backward = 0
        self.handles = [model.register_forward_hook(self._fwd)]

    def _fwd(self, module, args, output):
        self.forward += 1
        out = output if torch.is_tensor(output) else output[0]  # a transformers output
        if out.requires_grad:
            out.register_hook(self._bwd)

    def _bwd(self, *args):
        self.backward += 1

    def remove(self):
        for h in self.handles:
            h.remove()


# ---- forward-only trials ------------------------------------------------------------------------
def _gpt2_case():
    """A tiny GPT-2 from a config (no download) with PEFT LoRA on c_attn and c_proj; the
    closure's loss is the language-model loss of 8 random sequences."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    import warnings

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=20, n_positions=12, n_embd=16, n_layer=1,
                                     n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=0, eos_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(transformers.GPT2LMHeadModel(config), peft.LoraConfig(
            r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"], lora_dropout=0.0,
            fan_in_fan_out=True))
    tokens = torch.randint(0, 20, (8, 12))
    opt = LoRAStepOptimizer(model)

    def closure():
        opt.zero_grad()
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        return loss

    return model, opt, closure


@pytest.mark.parametrize("kind", ["mlp", "gpt2"])
def test_trials_are_forward_only(kind):
    """step(closure) runs the closure once with its backward, then one forward per trial and
    no backward; torch.autograd.backward is torch's own again afterwards."""
    if kind == "gpt2":
        model, opt, closure = _gpt2_case()
    else:
        model, x, y = _task()
        opt = LoRAStepOptimizer(model)
        closure = _closure(opt, model, x, y)
    count = Counter(model)
    original = torch.autograd.backward
    seen = []
    for _ in range(6):
        f0, b0 = count.forward, count.backward
        opt.step(closure)
        seen.append((count.forward - f0, count.backward - b0, opt.last.trials))
    count.remove()
    assert all(fwd == 1 + trials and bwd == 1 for fwd, bwd, trials in seen), seen
    assert sum(t for *_, t in seen) >= 6  # trials did run (eta > eta_t at every step)
    assert torch.autograd.backward is original
    assert not search.in_trial()
    with pytest.raises(RuntimeError, match="does not require grad"):
        torch.zeros(2).sum().backward()  # outside a trial backward() is torch's, unchanged


def test_trial_keeps_the_gradients_and_sees_the_flag():
    """p.grad after step(closure) is the gradient at V_t (what the update used), though the
    closure zeroes the gradients in every trial; in_trial() is True inside the trials only."""
    import copy

    model, x, y = _task(seed=1)
    twin = copy.deepcopy(model)
    nn.functional.cross_entropy(twin(x), y).backward()  # the gradient at V_t, plainly
    opt = LoRAStepOptimizer(model)
    flags = []
    inner = _closure(opt, model, x, y)

    def closure():
        flags.append(search.in_trial())
        if flags[-1]:
            grads = [p.grad for p in opt.param_groups[0]["params"]]
            opt.zero_grad()  # a no-op inside a trial
            assert all(g is p.grad for g, p in zip(grads, opt.param_groups[0]["params"]))
        return inner()

    opt.step(closure)
    assert flags[0] is False and all(flags[1:]) and len(flags) == 1 + opt.last.trials >= 2
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        if p.requires_grad:
            assert torch.equal(p.grad, q.grad), name
            if float(q.grad.abs().sum()) > 0:
                assert not torch.equal(p, q), name  # the step moved it


def test_backward_outside_the_trial_thread_is_untouched():
    """The guard is per thread: another thread's backward() on a tensor that needs no gradient
    raises as usual while this one is inside forward_only()."""
    import threading

    errors = []

    def other():
        try:
            torch.zeros(2).sum().backward()
        except RuntimeError as exc:
            errors.append(str(exc))

    with search.forward_only():
        assert search.in_trial()
        torch.zeros(2, requires_grad=True).sum().backward()  # no grad under no_grad: a no-op
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert len(errors) == 1 and "does not require grad" in errors[0]


def test_trials_replay_the_gradient_pass_dropout_masks():
    """LoRA dropout in train mode: every trial sees the dropout masks of the step's gradient
    pass (the function whose gradient is applied), so the accepted trial's loss is J(V_{t+1})
    under those masks and the certificate holds for it; the random stream then goes on as if
    no trial had run."""
    peft = pytest.importorskip("peft")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(13, 16), nn.Linear(16, 5)

        def forward(self, x):
            return self.fc2(torch.tanh(self.fc1(x)))

    torch.manual_seed(3)
    model = peft.get_peft_model(Net(), peft.LoraConfig(r=3, lora_alpha=6, lora_dropout=0.3,
                                                       target_modules=["fc1", "fc2"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    model.train()
    x, y = torch.randn(64, 13), torch.randint(0, 5, (64,))
    opt = LoRAStepOptimizer(model)
    closure = _closure(opt, model, x, y)
    searched = 0
    for t in range(8):
        state = torch.get_rng_state()
        opt.step(closure)
        info = opt.last
        after_step = torch.get_rng_state()
        torch.set_rng_state(state)  # the gradient pass's masks, at V_{t+1}
        with torch.no_grad():
            again = float(nn.functional.cross_entropy(model(x), y))
        assert torch.equal(after_step, torch.get_rng_state()), t  # one pass's draws, not more
        assert info.eta >= info.eta_theorem, t
        if info.eta > info.eta_theorem:
            searched += 1
            assert info.trial_losses[-1] == again, (t, info.trial_losses, again)
            assert again <= info.loss - 0.2 * info.eta * info.grad_sq, (t, info, again)
    assert searched >= 4


# ---- the certificate at every step, the median trials -------------------------------------------
def _run(steps, batch, seed=0, device="cpu", **kwargs):
    model, x, y = _task(seed)
    model, x, y = model.to(device), x.to(device), y.to(device)
    opt = LoRAStepOptimizer(model, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    records = []
    for _ in range(steps):
        rows = torch.randint(0, len(y), (batch,), generator=gen) if batch < len(y) else None
        xb, yb = (x, y) if rows is None else (x[rows], y[rows])
        opt.step(_closure(opt, model, xb, yb))
        with torch.no_grad():  # J(V_{t+1}) on the step's batch, computed afresh
            after = float(nn.functional.cross_entropy(model(xb), yb))
        records.append((opt.last, after))
    with torch.no_grad():
        final = float(nn.functional.cross_entropy(model(x), y))
    return records, final, opt


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [96, 16], ids=["full-batch", "mini-batch"])
def test_certificate_holds_at_every_step(batch, device):
    """eta >= eta_t and J(V_{t+1}) <= J(V_t) - eta/5 ||grad J(V_t)||^2 on the step's batch,
    at every step of a run (J(V_{t+1}) recomputed by a separate forward pass), on the CPU and
    on a GPU."""
    records, final, _ = _run(40, batch, device=device)
    first = records[0][0].loss
    for t, (info, after) in enumerate(records):
        assert info.eta >= info.eta_theorem, t
        assert after <= info.loss - 0.2 * info.eta * info.grad_sq, (t, info, after)
        if info.eta > info.eta_theorem:  # the accepted trial's loss is this very value
            assert info.trial_losses[-1] == after
    assert max(i.eta / i.eta_theorem for i, _ in records) > 10  # the search went past eta_t
    assert final < 0.5 * first


def test_median_step_takes_one_trial():
    """The first trial from the last step's model is accepted at most steps: the median step
    is one forward pass beyond the gradient's (<= 1.3 passes), the mean below 1.3."""
    records, _, _ = _run(60, 96)
    trials = [info.trials for info, _ in records]
    assert statistics.median(trials) == 1
    assert sum(trials[5:]) / len(trials[5:]) <= 1.3, trials


# ---- the search on a known function: the quadratic model, the state, the guard ------------------
class Quadratic:
    """phi(eta) = J0 - eta g2 + k eta^2 / 2, with the trials' etas recorded."""

    def __init__(self, J0=3.0, g2=2.0, k=5.0):
        self.J0, self.g2, self.k, self.etas = J0, g2, k, []

    def __call__(self, eta):
        self.etas.append(eta)
        return self.J0 - eta * self.g2 + 0.5 * self.k * eta * eta


def test_quadratic_model_hits_the_minimiser_at_the_next_first_trial():
    """On a quadratic phi: the first step backtracks from cap to the fitted minimiser
    g2 / k; the next step's first trial is that minimiser and is accepted (rho = 1/2)."""
    phi = Quadratic()
    ls = search.LineSearch(cap=1.0)
    eta, losses = ls.search(phi, phi.J0, phi.g2, 1e-6, v_sq=1e6, v_dot_grad=0.0)
    # cap = 1 fails (1.5 > 3 - 0.4); the fit through (1, 3.5) is exact: eta = g2 / k = 0.4
    assert phi.etas == pytest.approx([1.0, 0.4]) and eta == pytest.approx(0.4)
    assert ls.eta_star == pytest.approx(0.4)
    phi.etas.clear()
    eta, losses = ls.search(phi, phi.J0, phi.g2, 1e-6, v_sq=1e6, v_dot_grad=0.0)
    assert phi.etas == pytest.approx([0.4]) and len(losses) == 1


def test_state_kept_across_steps_and_through_state_dict():
    """The next first trial is min(growth * last eta, eta_star, cap); a fresh search loaded
    with state_dict() picks the same one, a fresh one without it starts at cap."""
    phi = Quadratic(k=0.5)  # minimiser 4: every trial below it is accepted
    ls = search.LineSearch(cap=10.0, growth=2.0)
    ls.search(phi, phi.J0, phi.g2, 1e-6, v_sq=1e6, v_dot_grad=0.0)
    assert phi.etas == [10.0, 4.0]  # 10 > 1.6 * 4 rejected; the fit's minimiser accepted
    assert ls.eta == 4.0 and ls.eta_star == 4.0
    phi.etas.clear()
    phi2 = Quadratic(k=0.5)
    ls2 = search.LineSearch(cap=10.0)
    ls2.load_state_dict(ls.state_dict())
    assert ls2.first_trial() == ls.first_trial() == min(2.0 * ls.eta, ls.eta_star, 10.0)
    assert search.LineSearch(cap=10.0).first_trial() == 10.0
    ls.search(phi, phi.J0, phi.g2, 1e-6, v_sq=1e6, v_dot_grad=0.0)
    ls2.search(phi2, phi2.J0, phi2.g2, 1e-6, v_sq=1e6, v_dot_grad=0.0)
    assert phi.etas == phi2.etas and ls.eta == ls2.eta


def test_falls_to_eta_theorem_without_a_trial_below_it():
    """A function that never decreases: the trials shrink to eta_t, which is taken untried."""
    etas = []

    def flat(eta):
        etas.append(eta)
        return 5.0

    ls = search.LineSearch(cap=1.0, max_trials=50)
    eta, losses = ls.search(flat, 5.0, 1.0, 1e-3, v_sq=1.0, v_dot_grad=0.0)
    assert eta == 1e-3 and min(etas) > 1e-3 and len(losses) == len(etas) < 10
    eta, losses = ls.search(lambda e: math.nan, 5.0, 1.0, 1e-3, v_sq=1.0, v_dot_grad=0.0)
    assert eta == 1e-3  # nan is a rejection


def test_guard_keeps_every_trial_inside_the_norm_growth():
    """No trial is run at an eta with ||V' - eta grad||^2 > v_growth ||V'||^2; the first
    trial is the largest eta on the boundary when cap lies outside it."""
    phi = Quadratic(k=1e-3)  # would accept huge steps
    v_sq, v_dot_grad, g2 = 4.0, -1.0, phi.g2  # moving along -grad grows ||V||
    ls = search.LineSearch(cap=100.0, v_growth=1.5)
    eta, _ = ls.search(phi, phi.J0, g2, 1e-6, v_sq=v_sq, v_dot_grad=v_dot_grad)
    grown = v_sq - 2 * eta * v_dot_grad + eta * eta * g2
    assert grown == pytest.approx(1.5 * v_sq) and phi.etas == [eta]
    for e in phi.etas:
        assert v_sq - 2 * e * v_dot_grad + e * e * g2 <= 1.5 * v_sq * (1 + 1e-12)


def test_guard_in_the_optimizer_bounds_the_adapters_growth():
    """With cap = 100 and v_growth = 1.05, every step that is not eta_t keeps ||V'_{t+1}||^2
    <= 1.05 ||V'_t||^2 (on mini-batches, where large steps fit one batch)."""
    model, x, y = _task(seed=3)
    opt = LoRAStepOptimizer(model, cap=100.0)
    opt.line_search.v_growth = 1.05
    gen = torch.Generator().manual_seed(3)
    bound_hit = 0
    for _ in range(25):
        rows = torch.randint(0, len(y), (8,), generator=gen)
        opt.step(_closure(opt, model, x[rows], y[rows]))
        v_after, _ = norms.v_and_grad_sq(opt.layers)
        info = opt.last
        if info.eta > info.eta_theorem:
            # the guard is exact in real arithmetic; the float32 parameters' rounding of
            # the update moves ||V'||^2 by a few float32 ulps at the boundary
            assert v_after <= 1.05 * info.v_sq * (1 + 1e-6)
            bound_hit += v_after > 1.04 * info.v_sq
    assert bound_hit > 0  # the guard did bind somewhere


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(c=0.3), ValueError, r"Armijo c must lie in \(0, 1/5\]"),
    (dict(growth=0.5), ValueError, "growth must be >= 1"),
    (dict(v_growth=0.9), ValueError, "v_growth must be >= 1"),
    (dict(cap=-1.0), ValueError, "cap must be positive"),
    (dict(cap="1"), TypeError, "cap must be a number"),
    (dict(max_trials=0), ValueError, "max_trials must be a positive integer"),
])
def test_bad_search_arguments(kwargs, error, words):
    with pytest.raises(error, match=words):
        search.LineSearch(**kwargs)


def test_bad_line_search_name():
    with pytest.raises(ValueError, match="line_search must be 'model' or 'halving'"):
        LoRAStepOptimizer(LoRALinear(3, 2, 1), line_search="wolfe")


# ---- the float32 norm: a certified upper bound, tight -------------------------------------------
@pytest.mark.parametrize("N, m, n", [(257, 37, 19), (1031, 5, 129), (64, 96, 80)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float32_norm_is_a_tight_upper_bound(N, m, n, dtype):
    """layer_norm_sq on float32/bf16 rows >= the float64 ||D^T X||_F^2 (but for float64
    rounding: (64, 96, 80) takes the float64 Gram route) and within 1 % of it; the row-norm
    bound lies above both."""
    gen = torch.Generator().manual_seed(N + m)
    D = (torch.randn(N, m, generator=gen) + 0.3).to(dtype)
    X = (torch.randn(N, n, generator=gen) - 0.2).to(dtype)
    exact = float(torch.sum((D.double().T @ X.double()) ** 2))
    value = norms.layer_norm_sq(D, X, "exact")
    bound = norms.layer_norm_sq(D, X, "bound")
    assert exact * (1 - 1e-12) <= value <= exact * 1.01, (value / exact - 1)
    assert value < bound
    assert bound >= float(sum(torch.linalg.vector_norm(D.double(), dim=1)
                              * torch.linalg.vector_norm(X.double(), dim=1))) ** 2


# ---- the speed example's quick mode -------------------------------------------------------------
def test_speed_example_quick_mode():
    """examples/torch_lora_speed.py --quick: on each task lorakern's certificate held at every
    step and the loss fell (the speed is the benchmark's business, not the test's)."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("torch_lora_speed",
                                                  ROOT / "examples" / "torch_lora_speed.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = example.main(["--quick"])
    assert set(results) == {"gpt2-full", "gpt2-mini", "mlp"}
    assert {r["method"] for r in results["mlp"]["runs"]} == {"lorakern", "lorakern-lazy", "adamw"}
    for name, result in results.items():
        for run in result["runs"]:
            evals = run["evals"]
            assert evals[-1][2] < evals[0][2], (name, run["method"])
            if run["method"].startswith("lorakern"):
                assert len(run["infos"]) == len(run["step_ms"]) > 0
                assert example.certificate_violations(run) == [], name


# ---- norm="lazy": the exact norm only when the search comes near eta_t --------------------------
def test_lazy_norm_takes_the_same_steps_and_skips_the_norm(monkeypatch):
    """norm="lazy" moves the adapters bit for bit as norm="exact"; it computes ||G|| only on
    the steps whose trials came down to eq. (8) with ||G|| = 0, and its eta_theorem (that
    ceiling, elsewhere) is >= the exact run's eta_t, which eta exceeds."""
    calls = []
    real = norms.g_sq

    def counted(records, norm):
        calls.append(norm)
        return real(records, norm)

    monkeypatch.setattr(norms, "g_sq", counted)
    runs = {}
    for norm in ("exact", "lazy"):
        calls.clear()
        records, final, opt = _run(15, 16, seed=4, norm=norm)
        runs[norm] = ([info for info, _ in records], len(calls),
                      [p.detach().clone() for p in opt.param_groups[0]["params"]])
    (exact, exact_calls, exact_params), (lazy, lazy_calls, lazy_params) = runs.values()
    assert all(torch.equal(p, q) for p, q in zip(exact_params, lazy_params))
    assert exact_calls == 15 and lazy_calls < exact_calls
    for e, z in zip(exact, lazy):
        assert z.eta == e.eta and z.eta_theorem >= e.eta_theorem and z.eta >= z.eta_theorem
        assert (z.g_norm is None) == (z.eta_theorem != e.eta_theorem)


def test_lazy_norm_computes_eta_t_when_the_search_needs_it():
    """A loss that never decreases along the trials: the search comes down to eta_t, so the
    lazy run computes ||G|| and takes exactly the exact run's eta_t."""
    etas = {}
    for norm in ("exact", "lazy"):
        model, x, y = _task(seed=5)
        opt = LoRAStepOptimizer(model, norm=norm)
        state = {"first": True}

        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            if state["first"]:
                state["first"] = False
                return loss
            return loss + 10.0  # every trial looks worse than V_t

        opt.step(closure)
        assert opt.last.trials > 0 and opt.last.eta == opt.last.eta_theorem
        assert opt.last.g_norm is not None
        etas[norm] = opt.last.eta
    assert etas["lazy"] == etas["exact"]

