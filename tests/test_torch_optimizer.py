"""LoRAStepOptimizer and the PyTorch ecosystem's conventions.

lr as eta's multiplier (schedulers write it), state_dict round trips (a resumed run is the
uninterrupted one, bit for bit), add_param_group refused, non-LoRA trainable parameters
refused by name or handed to a companion optimizer, GradScaler and clip_grad_norm_ (the eta
of the gradients applied), step post-hooks for loggers, and the HF Trainer on a tiny GPT-2
built from a config (no download).
"""
from __future__ import annotations

import io
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="lorakern.torch needs torch: pip install '.[torch]'")

from lorakern.testing import assert_close  # noqa: E402
from lorakern.torch import LoRALinear, LoRAStepOptimizer  # noqa: E402
from torch_models import MLP, cuda_ready, lora_mlp  # noqa: E402

nn = torch.nn


def _batch(seed, dtype=torch.float64, rows=12):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, 7, generator=g).to(dtype),
            torch.randn(rows, 4, generator=g).to(dtype))


def _loss(model, seed, dtype=torch.float64):
    x, y = _batch(seed, dtype)
    return torch.mean((model(x) - y) ** 2)


def _train(model, opt, seeds, closure=False):
    for seed in seeds:
        if closure:
            def run(seed=seed):
                opt.zero_grad()
                loss = _loss(model, seed)
                loss.backward()
                return loss
            opt.step(run)
        else:
            opt.zero_grad()
            _loss(model, seed).backward()
            opt.step()


def _lora(model):
    return torch.cat([p.detach().reshape(-1) for n, p in model.named_parameters() if "lora" in n])


# ---- lr ------------------------------------------------------------------------------------------
def test_lr_multiplies_eta():
    """lr = 1 (the default) is eta_t exactly; lr = 0.5 halves it (no warning); lr = 2
    warns that it voids the certificate."""
    etas = {}
    for lr in (1.0, 0.5, 2.0):
        model = lora_mlp()
        opt = LoRAStepOptimizer(model, lr=lr)
        assert opt.param_groups[0]["lr"] == lr
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _train(model, opt, [1])
        assert [str(w.message) for w in caught if "certified" in str(w.message)] == (
            [] if lr <= 1 else [f"lr = 2 > 1 multiplies eta_t past the theorem's step: "
                                f"Lemma 2's decrease is no longer certified"])
        assert opt.last.eta == lr * opt.last.eta_theorem
        etas[lr] = opt.last.eta
    assert etas[0.5] == 0.5 * etas[1.0] and etas[2.0] == 2.0 * etas[1.0]


@pytest.mark.parametrize("make", [
    lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (k + 1)),
    lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4),
    lambda opt: pytest.importorskip("transformers").get_linear_schedule_with_warmup(opt, 1, 5),
], ids=["LambdaLR", "cosine", "linear_warmup"])
def test_schedulers_set_the_multiplier(make):
    """Every step's eta is the scheduler's lr times that step's eta_t."""
    model = lora_mlp()
    opt = LoRAStepOptimizer(model)
    scheduler = make(opt)
    lrs = []
    for seed in range(4):
        lr = opt.param_groups[0]["lr"]
        _train(model, opt, [seed])
        scheduler.step()
        assert opt.last.lr == lr and opt.last.eta == lr * opt.last.eta_theorem
        lrs.append(lr)
    assert len(set(lrs)) > 1 and max(lrs) <= 1.0


def test_warm_up_from_lr_zero_with_the_line_search():
    """A warm-up's first lr is 0: step(closure) takes no step (no line search on a zero
    cap), then the search runs on lr * cap."""
    transformers = pytest.importorskip("transformers")
    model = lora_mlp()
    opt = LoRAStepOptimizer(model)
    scheduler = transformers.get_linear_schedule_with_warmup(opt, 2, 6)
    before = _lora(model)
    _train(model, opt, [0], closure=True)
    assert opt.last.eta == 0.0 and torch.equal(_lora(model), before)
    scheduler.step()
    _train(model, opt, [1], closure=True)
    assert opt.last.lr == 0.5 and opt.last.eta >= 0.5 * opt.last.eta_theorem > 0
    assert all(eta <= 0.5 for eta, _ in opt.last.tried)   # trials start at lr * cap
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="must be >= 0"):
        _train(model, opt, [2])


# ---- state ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("closure", [False, True], ids=["eta_t", "line_search"])
def test_resumed_run_is_the_uninterrupted_one(closure):
    """3 steps, state_dict through torch.save, a new model and optimizer (built with other
    arguments: load_state_dict restores L and lr), 3 more steps: the same bits as 6 steps."""
    model = lora_mlp()
    opt = LoRAStepOptimizer(model, lipschitz=3.0, lr=0.8)
    _train(model, opt, range(6), closure)
    want = _lora(model)

    model = lora_mlp()
    opt = LoRAStepOptimizer(model, lipschitz=3.0, lr=0.8)
    _train(model, opt, range(3), closure)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = lora_mlp(seed=1)
    resumed.load_state_dict(saved["model"])
    opt2 = LoRAStepOptimizer(resumed)
    opt2.load_state_dict(saved["opt"])
    assert opt2.lipschitz == 3.0 and opt2.param_groups[0]["lr"] == 0.8
    _train(resumed, opt2, range(3, 6), closure)
    assert torch.equal(_lora(resumed), want)
    if closure:
        assert opt2.state_dict()["lorakern"]["eta_prev"] is not None


def test_add_param_group_is_refused():
    opt = LoRAStepOptimizer(lora_mlp())
    with pytest.raises(ValueError, match="does not take add_param_group"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})


# ---- parameters that are not LoRA adapters -------------------------------------------------------
def _with_head():
    """LoRA on fc1, fc2 trainable in full (as PEFT's modules_to_save heads are)."""
    torch.manual_seed(0)
    model = MLP()
    model.fc1 = LoRALinear.from_linear(model.fc1, 2)
    return model


def test_non_lora_trainables_are_refused_by_name():
    with pytest.raises(ValueError, match="not LoRA adapters: fc2.weight, fc2.bias;"):
        LoRAStepOptimizer(_with_head())


def test_peft_seq_cls_head_is_refused_by_name():
    """A SEQ_CLS model's classifier (modules_to_save) is named, not silently left alone."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32,
                                     n_positions=8, num_labels=3, pad_token_id=0)
    torch.manual_seed(0)
    model = peft.get_peft_model(transformers.GPT2ForSequenceClassification(config),
                                peft.LoraConfig(task_type="SEQ_CLS", r=2,
                                                target_modules=["c_attn"], fan_in_fan_out=True))
    with pytest.raises(ValueError, match=r"not LoRA adapters: .*score"):
        LoRAStepOptimizer(model)
    opt = LoRAStepOptimizer(model, others=torch.optim.AdamW)
    assert isinstance(opt.others, torch.optim.AdamW)


@pytest.mark.parametrize("kind", ["class", "instance"])
def test_companion_optimizer_steps_zeroes_and_resumes(kind):
    """others=AdamW (a class, or an instance holding exactly the head): the head moves, is
    zeroed with zero_grad, follows the scheduler, and a resumed run is bitwise the same."""

    def build():
        model = _with_head()
        head = [model.fc2.weight, model.fc2.bias]
        others = torch.optim.AdamW if kind == "class" else torch.optim.AdamW(head, lr=1e-3)
        return model, LoRAStepOptimizer(model, others=others)

    model, opt = build()
    head0 = model.fc2.weight.detach().clone()
    assert len(opt.param_groups) == 2 and opt.param_groups[1] is opt.others.param_groups[0]
    _train(model, opt, range(4))
    assert not torch.equal(model.fc2.weight, head0)
    opt.zero_grad()
    assert model.fc2.weight.grad is None
    want = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    model, opt = build()
    _train(model, opt, range(2))
    saved = {"model": model.state_dict(), "opt": opt.state_dict()}
    assert "others" in saved["opt"]
    model2, opt2 = build()
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    assert opt2.param_groups[1] is opt2.others.param_groups[0]
    _train(model2, opt2, range(2, 4))
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in model2.parameters()]), want)


def test_companion_instance_must_hold_exactly_the_others():
    model = _with_head()
    with pytest.raises(ValueError, match="missing: fc2.bias"):
        LoRAStepOptimizer(model, others=torch.optim.SGD([model.fc2.weight], lr=0.1))
    with pytest.raises(ValueError, match="holds LoRA adapters"):
        LoRAStepOptimizer(model, others=torch.optim.SGD(model.parameters(), lr=0.1))


# ---- loss scaling, clipping, loggers -------------------------------------------------------------
def test_grad_scaler_gives_the_eta_of_the_unscaled_gradients():
    """torch.amp.GradScaler (scale 2^16): scale, backward, unscale_, step: eta and the step
    are those of the unscaled run."""
    model, plain = lora_mlp(dtype=torch.float32), lora_mlp(dtype=torch.float32)
    opt, plain_opt = LoRAStepOptimizer(model), LoRAStepOptimizer(plain)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    for seed in range(3):
        opt.zero_grad()
        scaler.scale(_loss(model, seed, torch.float32)).backward()
        scaler.step(opt)
        scaler.update()
        plain_opt.zero_grad()
        _loss(plain, seed, torch.float32).backward()
        plain_opt.step()
        assert_close(opt.last.grad_scale, 2.0 ** -16, np.float32, "grad_scale")
        assert_close(opt.last.eta, plain_opt.last.eta, np.float32, "eta")
    assert_close(_lora(model).numpy(), _lora(plain).numpy(), np.float32, "LoRA weights")


def test_clipping_gives_the_eta_of_the_clipped_gradients():
    """clip_grad_norm_ to a tenth of the norm: the step's ||G|| and grad_sq are the clipped
    gradients' (the clip factor, and its square, times the plain ones)."""
    model, plain = lora_mlp(), lora_mlp()
    opt, plain_opt = LoRAStepOptimizer(model), LoRAStepOptimizer(plain)
    _loss(plain, 1).backward()
    total = float(torch.nn.utils.get_total_norm([p.grad for p in plain.parameters()
                                                  if p.grad is not None]))
    plain_opt.step()
    _loss(model, 1).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), total / 10)
    opt.step()
    coef = (total / 10) / (total + 1e-6)   # clip_grad_norm_'s own factor
    assert abs(coef - 0.1) > 1e-9          # ... which is not 0.1 exactly
    assert_close(opt.last.grad_scale, coef, np.float64, "clip factor", 10)
    assert_close(opt.last.g_norm, coef * plain_opt.last.g_norm, np.float64, "||G||", 10)
    assert_close(opt.last.grad_sq, coef ** 2 * plain_opt.last.grad_sq, np.float64, "grad_sq", 10)


def test_step_post_hooks_see_every_step():
    """A logger on torch's step post-hook reads eta, ||G||, ||V||^2 and the trials."""
    model = lora_mlp()
    opt = LoRAStepOptimizer(model)
    logged = []
    opt.register_step_post_hook(lambda o, args, kwargs: logged.append(
        (o.last.eta, o.last.g_norm, o.last.v_sq, o.last.trials, list(o.last.tried))))
    _train(model, opt, range(2))
    _train(model, opt, range(2, 4), closure=True)
    assert len(logged) == 4 and all(g > 0 and v > 0 for _, g, v, _, _ in logged)
    for eta, _, _, trials, tried in logged[2:]:
        assert len(tried) == trials
        if tried and tried[-1][0] == eta:   # an accepted trial: its loss is logged
            assert tried[-1][1] is not None


# ---- the HF Trainer ------------------------------------------------------------------------------
def test_hf_trainer_runs_with_default_arguments(tmp_path):
    """transformers.Trainer(optimizers=(opt, None)) on a tiny GPT-2 from a config with PEFT
    LoRA (dropout 0.05, as recipes use): its default linear schedule sets lr, its default
    max_grad_norm = 1 clips, and the loss falls."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=32,
                                     n_positions=16)
    torch.manual_seed(0)
    model = peft.get_peft_model(transformers.GPT2LMHeadModel(config), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], lora_dropout=0.05,
        fan_in_fan_out=True))
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 32, (16,), generator=g) for _ in range(16)]
    data = [{"input_ids": r, "labels": r} for r in rows]
    opt = LoRAStepOptimizer(model)
    etas = []
    opt.register_step_post_hook(lambda o, a, k: etas.append((o.last.lr, o.last.eta,
                                                             o.last.eta_theorem)))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8,
        report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   optimizers=(opt, None))
    before = _lora(model)
    result = trainer.train()
    assert len(etas) == 4 and not torch.equal(_lora(model), before)
    assert [lr for lr, _, _ in etas] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    for lr, eta, eta_t in etas:
        assert eta == lr * eta_t
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and np.isfinite(result.training_loss)


# ---- CUDA ----------------------------------------------------------------------------------------
def _needs_cuda():
    if not cuda_ready():
        pytest.skip("needs a CUDA GPU visible to both PyTorch and CuPy")


@pytest.mark.parametrize("rows", [4, 64], ids=["rows_kept", "G_kept"])
def test_cuda_step_equals_the_cpu_step(rows):
    """The same model on CUDA and on the CPU, float32: the same ||G|| (rel 1e-5) whether the
    taps kept the rows (CuPy's norm) or G (a torch product on the GPU), lr and a scheduler,
    and a resumed state_dict loaded onto the GPU."""
    _needs_cuda()
    cpu, gpu = lora_mlp(dtype=torch.float32), lora_mlp(dtype=torch.float32).cuda()
    opts = [LoRAStepOptimizer(m, lr=0.5) for m in (cpu, gpu)]
    assert opts[1].device == "cuda:0"
    x, y = _batch(3, torch.float32, rows=rows)
    for model, opt, dev in zip((cpu, gpu), opts, ("cpu", "cuda")):
        torch.mean((model(x.to(dev)) - y.to(dev)) ** 2).backward()
        opt.step()
    assert_close(opts[1].last.g_norm, opts[0].last.g_norm, np.float32, "||G|| cuda")
    assert opts[1].last.eta == 0.5 * opts[1].last.eta_theorem
    resumed = LoRAStepOptimizer(gpu)
    resumed.load_state_dict(opts[1].state_dict())
    assert resumed.param_groups[0]["lr"] == 0.5


def test_cuda_fp16_autocast_with_grad_scaler():
    """fp16 autocast and torch.amp.GradScaler("cuda"): grad_scale is 1/S and the step's eta
    is within fp16 rounding of the unscaled float32 run's."""
    _needs_cuda()
    model, plain = lora_mlp(dtype=torch.float32).cuda(), lora_mlp(dtype=torch.float32).cuda()
    opt, plain_opt = LoRAStepOptimizer(model), LoRAStepOptimizer(plain)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 12)
    x, y = (t.cuda() for t in _batch(4, torch.float32))
    with torch.autocast("cuda", dtype=torch.float16):
        loss = torch.mean((model(x).float() - y) ** 2)
    scaler.scale(loss).backward()
    scaler.step(opt)
    torch.mean((plain(x) - y) ** 2).backward()
    plain_opt.step()
    assert abs(opt.last.grad_scale * 2.0 ** 12 - 1.0) < 5e-2
    assert abs(opt.last.eta / plain_opt.last.eta - 1.0) < 5e-2
