"""Entrywise losses, each written once and compiled for every backend.

A loss is a few lines of Python-syntax assignments that compute, for one entry,
``value`` (its contribution to L) and ``grad`` (dL/dZ at that entry). The body reads

* ``d = Z - Y`` for a *residual* loss (squared, huber): the problem then keeps only the
  residual R = W0 - Y and a step reads one m x n array, since d = R + BA;
* ``z = Z`` and ``y = Y`` for a *label* loss (logistic): the problem keeps W0 and Y;
* the loss parameter ``delta``.

and may call ``abs, exp, log1p, sqrt, minimum, maximum, where``. The same text becomes

* NumPy code (``numpy_pointwise``): the body runs on whole arrays (reference backend);
* a scalar function for Numba (``scalar_source``): the CPU kernels inline it;
* a CUDA C device function (``cuda_source``): the CUDA kernels include it.

Adding a loss is adding one ``Loss(...)`` entry to ``LOSSES``; no kernel changes.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass, fields
from functools import cached_property

import numpy as np

#: the functions a loss body may call, with their NumPy, scalar-Python and CUDA C spellings
_FUNCTIONS = {
    "abs": (np.abs, "abs", "fabs"),
    "exp": (np.exp, "math.exp", "exp"),
    "log1p": (np.log1p, "math.log1p", "log1p"),
    "sqrt": (np.sqrt, "math.sqrt", "sqrt"),
    "minimum": (np.minimum, "min", "fmin"),
    "maximum": (np.maximum, "max", "fmax"),
    "where": (np.where, None, None),  # ternary in scalar code
}


@dataclass(frozen=True)
class Loss:
    """One entrywise loss: ``value`` and ``grad`` per entry, and its smoothness constant.

    Parameters
    ----------
    name : the name users pass as ``Problem(..., loss=name)``.
    lipschitz : L such that the entrywise gradient is L-Lipschitz (Assumption 1).
    labels : True if the body reads ``z`` and ``y`` (needs W0 and Y), False if it reads ``d``.
    body : assignments ending in ``value = ...`` and ``grad = ...``.
    """

    name: str
    lipschitz: float
    labels: bool
    body: str

    def __reduce__(self):
        return _reduce(self)

    @cached_property
    def _statements(self) -> list[ast.Assign]:
        tree = ast.parse(self.body.strip())
        targets = [s.targets[0].id for s in tree.body]
        if targets[-2:] != ["value", "grad"]:
            raise ValueError(f"loss {self.name!r}: body must end with value = ..., grad = ...")
        return tree.body

    @property
    def uses_delta(self) -> bool:
        """Whether the body reads the parameter ``delta`` (Huber's threshold)."""
        return any(isinstance(node, ast.Name) and node.id == "delta"
                   for stmt in self._statements for node in ast.walk(stmt.value))

    @property
    def inputs(self) -> tuple[str, ...]:
        return ("z", "y") if self.labels else ("d",)

    # -- NumPy --------------------------------------------------------------------------
    def numpy_pointwise(self, t, y, delta):
        """(value, grad) arrays for pre-activation ``t`` (d or z) and labels ``y``."""
        env = {name: fns[0] for name, fns in _FUNCTIONS.items()}
        env.update({"delta": delta, "y": y, self.inputs[0]: t})
        exec(compile(ast.Module(self._statements, []), f"<loss {self.name}>", "exec"), env)
        return env["value"], env["grad"]

    def array_pointwise(self, xp, t, y, delta):
        """``numpy_pointwise`` in the array namespace ``xp`` (numpy or cupy): the same body,
        each function looked up by its NumPy name in ``xp``."""
        env = {name: getattr(xp, fns[0].__name__) for name, fns in _FUNCTIONS.items()}
        env.update({"delta": delta, "y": y, self.inputs[0]: t})
        exec(compile(ast.Module(self._statements, []), f"<loss {self.name}>", "exec"), env)
        return env["value"], env["grad"]

    # -- scalar Python (Numba) ----------------------------------------------------------
    def scalar_source(self, fname: str) -> str:
        """``def fname(t, y, delta): ...; return value, grad`` for Numba to compile."""
        lines = [f"def {fname}(t, y, delta):", f"    {self.inputs[0]} = t"]
        for stmt in self._statements:
            lines.append(f"    {stmt.targets[0].id} = {_Translate('py').visit(stmt.value)}")
        lines.append("    return value, grad")
        return "\n".join(lines) + "\n"

    # -- CUDA C -------------------------------------------------------------------------
    def cuda_source(self) -> str:
        """A device function ``loss_pointwise<T>(t, y, delta, &value, &grad)``.

        Arithmetic runs in double (constants are double literals); the caller rounds
        ``grad`` to T and keeps ``value`` in double for the loss reduction.
        """
        lines = [
            "template <typename T>",
            "__device__ __forceinline__ void loss_pointwise("
            "T t_, T y_, double delta, double* value_out, double* grad_out) {",
            f"    const double {self.inputs[0]} = (double)t_;",
            "    const double y = (double)y_; (void)y;",
        ]
        for stmt in self._statements:
            name = stmt.targets[0].id
            expr = _Translate("c").visit(stmt.value)
            lines.append(f"    const double {name} = {expr};")
        lines += ["    *value_out = value;", "    *grad_out = grad;", "}"]
        return "\n".join(lines) + "\n"


class _Translate(ast.NodeVisitor):
    """A loss expression as scalar Python ('py') or C ('c') source text."""

    _BINOPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
    _CMPOPS = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "=="}

    def __init__(self, lang: str):
        self.lang = lang

    def visit_BinOp(self, node):
        return f"({self.visit(node.left)} {self._BINOPS[type(node.op)]} {self.visit(node.right)})"

    def visit_UnaryOp(self, node):
        if not isinstance(node.op, ast.USub):
            raise ValueError("only unary minus is allowed in a loss body")
        return f"(-{self.visit(node.operand)})"

    def visit_Compare(self, node):
        (op,), (right,) = node.ops, node.comparators
        return f"({self.visit(node.left)} {self._CMPOPS[type(op)]} {self.visit(right)})"

    def visit_Constant(self, node):
        return repr(float(node.value))

    def visit_Name(self, node):
        return node.id

    def visit_Call(self, node):
        name = node.func.id
        args = [self.visit(a) for a in node.args]
        if name == "where":
            cond, a, b = args
            return f"({a} if {cond} else {b})" if self.lang == "py" else f"({cond} ? {a} : {b})"
        spelled = _FUNCTIONS[name][1 if self.lang == "py" else 2]
        return f"{spelled}({', '.join(args)})"

    def generic_visit(self, node):
        raise ValueError(f"{type(node).__name__} is not allowed in a loss body")


LOSSES: dict[str, Loss] = {
    loss.name: loss
    for loss in [
        Loss("squared", lipschitz=1.0, labels=False, body="""
value = 0.5 * d * d
grad = d
"""),
        # quadratic inside |d| <= delta, linear outside; gradient clip(d, -delta, delta)
        Loss("huber", lipschitz=1.0, labels=False, body="""
a = abs(d)
value = where(a <= delta, 0.5 * d * d, delta * (a - 0.5 * delta))
grad = minimum(maximum(d, -delta), delta)
"""),
        # log(1 + exp(-y z)) = max(-m, 0) + log1p(exp(-|m|)), m = y z, never overflows;
        # gradient -y / (1 + exp(m)) = -y * sigmoid(-m), with e = exp(-|m|) <= 1 in both branches
        Loss("logistic", lipschitz=0.25, labels=True, body="""
m = y * z
e = exp(-abs(m))
value = maximum(-m, 0.0) + log1p(e)
grad = -y * where(m >= 0.0, e, 1.0) / (1.0 + e)
"""),
    ]
}


# -- row-wise losses -----------------------------------------------------------------------

@dataclass(frozen=True)
class RowLoss:
    """A loss of a whole row z (the m outputs of one sample) and one integer label y in
    [0, m): not entrywise, so it is not in LOSSES (the matrix kind has no rows to read).
    The linear kind (problems/linear.py) takes it; each device writes the row sweep itself
    (``rows`` below for NumPy and CuPy, a Numba loop in _cpu/linear_kernels.py).

    Parameters
    ----------
    name : the name users pass as ``LinearProblem(..., loss=name)``.
    lipschitz : L such that the row gradient is L-Lipschitz in z (Assumption 1).
    """

    name: str
    lipschitz: float

    labels = "class"     # Y is an (N,) integer array of class indices
    uses_delta = False

    def __reduce__(self):
        return _reduce(self)

    def rows(self, xp, Z, y):
        """(value per row (N,), grad (N, m)) of the softmax cross-entropy, in Z's dtype.

        value_i = logsumexp(z_i) - z_i[y_i] = log(sum_j exp(z_ij - max_i)) - (z_i[y_i] - max_i),
        grad_i = softmax(z_i) - e_{y_i}; the shift by the row's max keeps every exp <= 1,
        so nothing overflows (and the sum is >= 1, so the log is finite).
        """
        N = Z.shape[0]
        shifted = Z - Z.max(axis=1, keepdims=True)
        e = xp.exp(shifted)
        s = e.sum(axis=1)
        rows = xp.arange(N)
        value = xp.log(s) - shifted[rows, y]
        grad = e / s[:, None]
        grad[rows, y] -= 1.0
        return value, grad


#: cross-entropy: the Hessian of logsumexp is H = diag(p) - p p^T, and v^T H v is the
#: variance of the values v_j drawn with probabilities p_j, at most (max v - min v)^2 / 4
#: <= (v_a^2 + v_b^2) / 2 <= 1/2 for a unit v: the row gradient is 1/2-Lipschitz
CROSS_ENTROPY = RowLoss("cross_entropy", lipschitz=0.5)

#: the losses of the linear kind: the entrywise ones (over the N x m outputs) and the row-wise
LINEAR_LOSSES: dict[str, object] = {**LOSSES, CROSS_ENTROPY.name: CROSS_ENTROPY}


def _reduce(loss):
    """How a loss pickles: a registered one as its name, coming back as the registered object
    (a few bytes, without the parsed body it caches); any other by its fields."""
    if LINEAR_LOSSES.get(loss.name) == loss:
        return _registered, (loss.name,)
    return _rebuild, (type(loss), {f.name: getattr(loss, f.name) for f in fields(loss)})


def _registered(name: str):
    return LINEAR_LOSSES[name]


def _rebuild(cls, values: dict):
    return cls(**values)
