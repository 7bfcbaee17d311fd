"""lorakern: fused kernels for LoRA gradient descent with the step size of Mu & Klabjan (2025).

    >>> import lorakern
    >>> problem = lorakern.Problem(W0, Y)
    >>> B, A = lorakern.init_adapters(m, n, rank=16, dtype=W0.dtype, seed=0)
    >>> result = lorakern.fit(problem, B, A, steps=100, device="cpu")
    >>> lorakern.theory.check(result).all_hold   # Lemma 2 and Theorem 3 on the run
    True

The default step, ``step_size="certified"``, is the one to fit with (a line search keeping
Lemma 2's decrease with eta >= eta_t); ``step_size="theorem"`` is the paper's eta_t itself
(the default until 2026-12: name it to reproduce the paper, or to run a GPU fit as one
device-side loop).

``LinearProblem(X, Y, W0, loss=...)`` is LoRA of a linear layer applied to data (inputs X,
outputs X (W0 + BA)^T); ``step`` and ``fit`` take either kind (docs/linear.md).
"""
from . import reference, theory
from ._dispatch import DeviceUnavailableError, devices
from ._interrupt import FitInterrupted
from ._validate import InputWarning
from .adapters import init_adapters, merge
from .descent import fit, step
from .losses import LOSSES
from .problems import LinearProblem, Problem
from .results import FitProgress, FitResult, History, StepResult
from .step_size import Armijo, Certified, Constant, StepSize, Theorem

__version__ = "0.1.0"

__all__ = [
    "Problem", "LinearProblem", "step", "fit", "init_adapters", "merge", "devices",
    "DeviceUnavailableError", "InputWarning", "FitInterrupted",
    "StepResult", "FitResult", "FitProgress", "History", "Theorem", "Certified", "Constant",
    "Armijo", "StepSize", "LOSSES",
    "reference", "theory", "__version__",
]
