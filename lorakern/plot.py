"""``lorakern demo --plot``: the theorem, constant and Armijo steps on one problem, compared.

``comparison_runs`` fits the demo problem with each policy from the same start (reusing the
demo's own run where its policy is one of them, and adding it as a curve where it is not);
``save_comparison_plot`` draws J(V_t) against steps and against seconds. Needs matplotlib
(imported here only, when a plot is asked for).
"""
from __future__ import annotations

import numbers
import os
from pathlib import Path

import numpy as np

from .step_size import THEOREM_CONSTANT

#: the comparison's default constant step, CONSTANT_FACTOR / (max(L, 1) (||V_0||^2 + ||G_0||_F)):
#: 5 sqrt(2) / 2 ~ 3.5 times the theorem's first eta, stable on the demo problems
CONSTANT_FACTOR = 0.5

PLOT_HINT = 'pip install ".[plot]" in a clone of lorakern'

#: curve styles by policy name; other policies cycle through EXTRA_STYLES
STYLES = {"theorem": ("C0", "-"), "constant": ("C1", "--"), "armijo": ("C2", "-."),
          "certified": ("C3", ":")}
EXTRA_STYLES = (("C6", ":"), ("C4", (0, (3, 1, 1, 1))), ("C5", (0, (5, 2))))


def check_path(path) -> str | None:
    """Why a plot cannot be written to ``path`` (a message), or None if it can: the folder
    exists and is writable and the path is not a folder. Checked before the demo runs."""
    p = Path(os.path.expanduser(str(path)))
    if p.is_dir():
        return f"{path} is a directory; give a file name such as {p / 'demo.png'}"
    folder = p.parent
    if not folder.is_dir():
        return f"the folder {folder} does not exist (for {path})"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"the folder {folder} is not writable (for {path})"
    if p.exists() and not os.access(p, os.W_OK):
        return f"{path} exists and is not writable"
    return None


def check_format(path) -> str | None:
    """Why matplotlib cannot write ``path``'s format (its extension), or None if it can (no
    extension: matplotlib writes PNG)."""
    suffix = Path(str(path)).suffix.lower().lstrip(".")
    if not suffix:
        return None
    from matplotlib.figure import Figure

    formats = Figure().canvas.get_supported_filetypes()
    if suffix in formats:
        return None
    return f"matplotlib cannot write .{suffix} files; use one of " + ", ".join("." + f for f in sorted(formats))


def constant_for(main_result, constant: float | None = None) -> float:
    """The comparison's constant eta: ``constant`` if given, the demo run's own if it used a
    constant step, else CONSTANT_FACTOR / (max(L, 1) (||V_0||^2 + ||G_0||_F))."""
    if constant is not None:
        return float(constant)
    policy = main_result.step_size
    eta = getattr(policy, "eta", None)
    if getattr(policy, "decrease", 0) is None and isinstance(eta, numbers.Real):
        return float(eta)
    h = main_result.history
    return float(CONSTANT_FACTOR / (h.lipschitz * (h.v_sq[0] + h.g_norm[0])))


def constant_note(constant: float, source: str | None = None) -> str:
    """Where the constant eta came from, for the plot's caption."""
    if source is not None:
        return f"constant eta = {constant:.4g} ({source})"
    return (f"constant eta = {CONSTANT_FACTOR:g} / (max(L,1) (||V_0||^2 + ||G_0||_F)) = {constant:.4g}, "
            f"{CONSTANT_FACTOR * THEOREM_CONSTANT:.3g}x the theorem's eta_0")


def comparison_runs(demo, steps: int, device: str, main_result, *, constant: float | None = None,
                    warm_up=None) -> tuple[dict, float]:
    """The theorem, constant, armijo and certified fits of ``demo`` from the same start, and the seconds
    spent compiling for them. A run whose policy equals the demo's reuses its result; a demo
    policy that is none of the three is added as its own curve."""
    from .descent import fit
    from .step_size import Armijo, Certified, Constant, Theorem
    from .theory import policy_name

    policies = {"theorem": Theorem(), "constant": Constant(constant_for(main_result, constant)),
                "armijo": Armijo(), "certified": Certified()}
    main = main_result.step_size
    compile_s = 0.0
    runs = {}
    for name, policy in policies.items():
        if policy == main:
            runs[name] = main_result
            continue
        if warm_up is not None and device != "reference":
            compile_s += warm_up(demo.twin, demo.B.shape[1], device, policy)
        runs[name] = fit(demo.problem, demo.B, demo.A, steps=steps, device=device, step_size=policy)
    if not any(result is main_result for result in runs.values()):
        name = policy_name(main)
        runs[name if name not in runs else f"{name} (the run above)"] = main_result
    return runs, compile_s


def elapsed(runs: dict) -> dict:
    """Cumulative seconds at V_0..V_T for each run, from each fit's measured wall time.

    A run without line-search trials does one fused pass per step: its time is spread evenly.
    A run with trials (armijo) does one fused pass plus ``trials`` loss-only passes per step;
    the fused pass costs what a step of the "theorem" run (else of any run without trials)
    cost, the loss-only pass (its time - steps x that) / trials.
    """
    plain = [r for name, r in runs.items() if not np.any(r.history.trials[:r.steps])]
    base = runs.get("theorem") or (plain[0] if plain else None)
    t_fused = base.seconds / max(base.steps, 1) if base is not None else None
    out = {}
    for name, result in runs.items():
        T = result.steps
        trials = np.asarray(result.history.trials[:T], dtype=float)
        if T and trials.any() and t_fused is not None:
            t_loss = max(result.seconds - T * t_fused, 0.0) / max(trials.sum(), 1.0)
            cost = t_fused + trials * t_loss
            cum = np.cumsum(cost) * (result.seconds / cost.sum())
        else:
            cum = np.arange(1, T + 1) * (result.seconds / max(T, 1))
        out[name] = np.concatenate([[0.0], cum])
    return out


def curve_label(result) -> str:
    """The legend entry of a run, from its policy's parameters."""
    from .theory import policy_name

    policy = result.step_size
    constant, eta, c = (getattr(policy, a, None) for a in ("constant", "eta", "c"))
    trials = int(np.sum(result.history.trials))
    if constant is not None:
        label = (r"theorem: $\eta_t$ of eq. 8" if constant == THEOREM_CONSTANT else
                 rf"theorem: eq. 8 with {constant:.3g} for $5\sqrt{{2}}$")
    elif getattr(policy, "decrease", 0) is None and eta is not None:
        label = rf"constant: $\eta$ = {eta:.3g}"
    elif c is not None:
        label = f"{policy_name(policy)}: c = {c:g} ({trials} loss passes)"
    else:
        label = policy_name(policy) + (f" ({trials} loss passes)" if trials else "")
    if result.status == "diverged":
        label += f", diverged at t = {result.steps}"
    return label


def save_comparison_plot(runs, path, *, title: str, constant_note: str, planted: float | None = None,
                         planted_label: str = "J at the planted shift BA = S") -> str:
    """Two panels, J(V_t) against steps and against seconds, for each run; returns path."""
    from matplotlib.figure import Figure

    seconds = elapsed(runs)
    fig = Figure(figsize=(11, 4.8), layout="constrained")
    ax_steps, ax_time = fig.subplots(1, 2)
    extra = iter(EXTRA_STYLES * len(runs))
    for name, result in runs.items():
        loss = np.append(result.history.loss[:result.steps], result.final_loss)
        label = curve_label(result)
        color, dash = STYLES.get(name) or next(extra)
        positive = loss > 0
        ax_steps.plot(np.arange(loss.size)[positive], loss[positive], linestyle=dash, color=color,
                      label=label)
        ax_time.plot(seconds[name][positive], loss[positive], linestyle=dash, color=color, label=label)
    for ax, xlabel in ((ax_steps, "step t"), (ax_time, "seconds (fit wall time, compile excluded)")):
        if planted is not None and planted > 0:
            ax.axhline(planted, color="0.5", lw=0.8, ls=":",
                       label=planted_label if ax is ax_steps else None)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(r"loss $J(V_t)$")
        ax.grid(True, which="both", alpha=0.3)
    ax_steps.set_title("against steps")
    ax_time.set_title("against seconds")
    ax_steps.legend(loc="best", fontsize="small")
    fig.suptitle(f"lorakern demo: LoRA gradient descent, {title}")
    fig.text(0.5, -0.01,
             f"{constant_note}.\nSeconds: each fit's measured wall time; a step without line-search "
             f"trials spread evenly (one fused pass each), armijo spread by its passes\n(one fused pass + "
             f"its trials' loss-only passes, the loss-only pass timed as (armijo - theorem time) / trials).",
             ha="center", va="top", fontsize="small")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return str(path)
