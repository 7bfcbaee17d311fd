"""LoRAStepOptimizer's memory over a run: RSS in the lifecycle scenarios of issue 30, and the
peak with gradient checkpointing against AdamW's.

    python benchmarks/torch_lifecycle.py rss            # 5 scenarios x 200 steps, RSS deltas
    python benchmarks/torch_lifecycle.py checkpoint     # peak RSS, 4 configs, fresh processes
    python benchmarks/torch_lifecycle.py rss --steps 50 --embd 64

A tiny GPT-2 built from a config (no download) with PEFT LoRA on c_attn and c_proj, random
tokens. **rss**: each scenario, in a fresh process, runs 20 warm-up iterations, reads the
RSS (after gc), runs ``--steps`` more and reads it again; the delta is what the scenario
retained:

- train: the optimizer's own loop (control);
- del_opt: ``del opt`` (no other reference), then AdamW steps on the same model;
- rebuilt_5x: the optimizer built 5 times on the model (all 5 kept alive, as a notebook's
  Out[] keeps them), then steps with the last;
- eval_forwards: ``model.eval()`` forward passes with gradients enabled, no backward;
- skipped_steps: forward, backward, ``model.zero_grad()``, never ``opt.step()``.

**checkpoint**: one fresh process per config (AdamW or LoRAStepOptimizer, with or without
``model.gradient_checkpointing_enable()``) runs 3 training steps and reports its peak RSS
(``ru_maxrss``) above the RSS before the first step, with glibc's malloc told to return large
blocks at once (PEAK_ENV); the saving is the peak without checkpointing minus the peak with
it.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time

import psutil
import torch


#: glibc malloc returns large blocks to the system at once (mmap above 64 KiB, no trim
#: slack), so the peak RSS follows the tensors alive rather than the allocator's moving
#: mmap threshold (without it two runs' peaks differed by up to 90 MB)
PEAK_ENV = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")


def build(embd, layers, seq, seed=0):
    import peft
    import transformers

    config = transformers.GPT2Config(n_layer=layers, n_embd=embd, n_head=4, vocab_size=256,
                                     n_positions=seq, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config)
    return peft.get_peft_model(model, peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True))


def batch(args, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (args.batch, args.seq), generator=g)
    return ids


def loss_of(model, ids):
    return model(input_ids=ids, labels=ids).loss


def rss_mb():
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def scenario(name, args):
    from lorakern.torch import LoRAStepOptimizer

    model = build(args.embd, args.layers, args.seq)
    opt = LoRAStepOptimizer(model)
    keep = []
    adamw = None

    def one(i):
        nonlocal opt, adamw
        ids = batch(args, i)
        if name == "train":
            opt.zero_grad()
            loss_of(model, ids).backward()
            opt.step()
        elif name == "del_opt":
            if opt is not None:
                opt = None  # the only reference: its hooks go with it
                adamw = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                          lr=1e-3)
            adamw.zero_grad()
            loss_of(model, ids).backward()
            adamw.step()
        elif name == "rebuilt_5x":
            if not keep:
                keep.extend(LoRAStepOptimizer(model) for _ in range(5))
                opt = keep[-1]
            opt.zero_grad()
            loss_of(model, ids).backward()
            opt.step()
        elif name == "eval_forwards":
            model.eval()
            loss_of(model, ids)
        elif name == "skipped_steps":
            loss_of(model, ids).backward()
            model.zero_grad()

    for i in range(20):
        one(i)
    before = rss_mb()
    t0 = time.perf_counter()
    for i in range(20, 20 + args.steps):
        one(i)
    seconds = time.perf_counter() - t0
    return dict(scenario=name, rss_before_mb=round(before, 1),
                delta_mb=round(rss_mb() - before, 1), steps=args.steps,
                seconds=round(seconds, 1))


def peak(args, method, ckpt):
    model = build(args.embd, args.layers, args.seq)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    if method == "adamw":
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    else:
        from lorakern.torch import LoRAStepOptimizer
        opt = LoRAStepOptimizer(model)
    ids = batch(args, 0)
    base = rss_mb()
    for _ in range(3):
        opt.zero_grad()
        loss_of(model, ids).backward()
        opt.step()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dict(method=method, checkpointing=ckpt, base_mb=round(base, 1),
                peak_above_base_mb=round(peak_mb - base, 1))


SCENARIOS = ("train", "del_opt", "rebuilt_5x", "eval_forwards", "skipped_steps")


def _shape(args):
    return ["--embd", str(args.embd), "--layers", str(args.layers), "--seq", str(args.seq),
            "--batch", str(args.batch), "--threads", str(args.threads), "--steps",
            str(args.steps)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["rss", "checkpoint", "_rss", "_peak"])
    parser.add_argument("--scenario", choices=SCENARIOS)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--embd", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--method", default="lorakern")
    parser.add_argument("--ckpt", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.what == "rss":
        for name in SCENARIOS:  # each in a fresh process: one's leak cannot hide another's
            cmd = [sys.executable, __file__, "_rss", "--scenario", name] + _shape(args)
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            print(out.strip().splitlines()[-1], flush=True)
    elif args.what == "_rss":
        print(json.dumps(scenario(args.scenario, args)), flush=True)
    elif args.what == "_peak":
        print(json.dumps(peak(args, args.method, bool(args.ckpt))), flush=True)
    else:
        rows = []
        for method in ("adamw", "lorakern"):
            for ckpt in (0, 1):
                cmd = [sys.executable, __file__, "_peak", "--method", method, "--ckpt",
                       str(ckpt)] + _shape(args)
                out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                     env=PEAK_ENV).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), flush=True)
        for method in ("adamw", "lorakern"):
            off, on = (r["peak_above_base_mb"] for r in rows if r["method"] == method)
            print(f"{method}: checkpointing saves {off - on:.1f} MB of {off:.1f}")


if __name__ == "__main__":
    main()
