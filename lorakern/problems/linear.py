"""The linear kind: LoRA of a linear layer applied to data.

J(B, A) = (1/N) sum_i loss(z_i, y_i) with Z = X (W0 + BA)^T (N x m), X the N x n inputs and
W0 the m x n frozen weight (out x in, as ``torch.nn.Linear`` and PEFT keep it). The paper's
original loss is L(W) = J at W0 + W; its gradient is

    G = grad_W J = (1/N) Delta^T X,   Delta = dloss/dZ  (N x m),

and grad_B = G A^T = (1/N) Delta^T (X A^T), grad_A = B^T G = (1/N) (Delta B)^T X (eq. 3), so a
step needs no m x n matrix: the kernels sweep the rows of X once (O(N r (m + n)) work).
Only ||G||_F, which eta_t needs (eq. 8), couples all samples: see the class notes, ``norm_costs``
(which of the exact norm's strategies is cheapest on a device) and ``norm_bound_sq``.

The problem is validated once; the devices prepare from it what they read (X W0^T, or the
residual X W0^T - Y for residual losses; the Gram XX^T or the moments (X W0^T - Y)^T X and
X^T X when the norm strategy uses them).
"""
from __future__ import annotations

import math
from functools import cached_property
from typing import NamedTuple

import numpy as np

from .._validate import array_namespace, as_array, check_matrix, positive_float, reject_masked
from ..losses import LINEAR_LOSSES
from ._common import KindBase

#: the exact norm ||Delta^T X||_F's strategies (``norm_costs``); a tie in cost goes to the first
NORM_STRATEGIES = ("moments", "gram", "tiles")
#: "gram" needs the two N x N float64 matrices (X X^T kept, Delta Delta^T per step) to fit
GRAM_MAX_BYTES = 1 << 30
#: "moments" needs C0 (m x n) and Sigma (n x n), both float64 and kept, to fit
MOMENTS_MAX_BYTES = 1 << 30
#: the one-time products of a strategy (X X^T; C0 and Sigma) are charged 1/AMORTISE_STEPS of
#: their cost per step: a fit of fewer steps pays more for them than the model says
AMORTISE_STEPS = 100


class CostWeights(NamedTuple):
    """What a unit of work costs on a device, in float32 multiply-adds of a BLAS product."""

    mac32: float  # a float32 multiply-add in a BLAS product: the unit
    mac64: float  # a float64 multiply-add in a BLAS product
    byte: float   # a byte streamed to or from memory


#: per device kind. "cpu": the 2-core development machine (Intel Xeon, AVX-512; NumPy's
#: OpenBLAS), measured 2026-12-04 (benchmarks/NOTES.md): sgemm 146 GMAC/s, dgemm 67 GMAC/s
#: (2.2x) at 2048^2, a float64 sum 32 GB/s (146 / 32 = 4.6 multiply-adds per byte); AVX2
#: has the same 2x between float32 and float64. "cuda": an H200 from its data sheet: SGEMM
#: 67 TFLOP/s on the CUDA cores (CuPy does not use TF32 unless asked), DGEMM 67 TFLOP/s on
#: the DMMA tensor cores, HBM3e 4.8 TB/s (33.5e12 / 4.8e12 = 7 multiply-adds per byte).
COST_WEIGHTS = {
    "cpu": CostWeights(mac32=1.0, mac64=2.2, byte=4.6),
    "cuda": CostWeights(mac32=1.0, mac64=1.0, byte=7.0),
}
#: device kinds priced as another: the reference and Dask's shards compute on the host CPU
COST_ALIASES = {"reference": "cpu", "dask": "cpu"}
#: the rank ``norm_strategy`` (no adapters at hand) prices "moments" at; a pass uses its own
NOMINAL_RANK = 16
#: the Gram of X whose top eigenvalue is found exactly (eigvalsh) up to this size; above it
#: by Lanczos (at most LANCZOS_STEPS products). Either estimate is then certified
#: (``_certified_sigma_sq``).
EIGH_MAX = 1024
LANCZOS_STEPS = 300
#: relative slack on the certified bound on ||G||_F, by dtype: covers the rounding of
#: ||Delta||_F and J that the kernels accumulate (and of the exact norm they are compared
#: with), so that the bound stays above the norm computed from the same Delta. It makes
#: eta_t smaller by at most this fraction.
BOUND_MARGIN = {np.dtype(np.float32): 2.0 ** -12, np.dtype(np.float64): 2.0 ** -30}

_EPS64 = float(np.finfo(np.float64).eps)


class LinearProblem(KindBase):
    """J(B, A) = (1/N) sum_i loss(z_i, y_i), Z = X (W0 + BA)^T: LoRA of a linear layer.

    Parameters
    ----------
    X : (N, n) float32 or float64 array, the inputs (one sample per row); NumPy or CuPy, or
        any array with ``__dlpack__`` (a torch tensor on the CPU or a GPU, an ``nn.Parameter``,
        a JAX array), read without a copy; the problem keeps its own copy, as of NumPy arrays.
    Y : the targets. (N, m) of X's dtype for "squared", "huber" and "logistic" (entries in
        {-1, +1}: one-vs-rest); an (N,) integer array of class indices in [0, m) for
        "cross_entropy".
    W0 : (m, n) array of X's dtype, the frozen weight (out x in). B is m x r, A is r x n.
    loss : "squared" (1/2 ||z - y||^2), "huber" (entrywise, threshold ``delta``),
        "logistic" (entrywise log(1 + exp(-y z))) or "cross_entropy" (softmax over the m
        outputs, computed with the row's max subtracted, so it never overflows).
    delta : the Huber threshold (> 0). Only "huber" reads it; any other value than the
        default 1.0 for another loss is an error.
    lipschitz : L, the smoothness constant of J in W; None computes a guaranteed upper
        bound (below). The step size uses max(L, 1), as for the matrix kind.
    norm_strategy : how the exact ||G||_F is computed (below): "auto" (the cheapest on the
        device that runs the pass: ``norm_strategy_for(device, rank)``), or "moments"
        (squared loss only), "gram" or "tiles" on every device.

    Notes
    -----
    **The constant L.** The Hessian of J in W is (1/N) sum_i (x_i x_i^T) (x) H_i with H_i the
    loss's Hessian in z_i, H_i <= L_loss I, so L = L_loss sigma_max(X)^2 / N with
    L_loss = 1 (squared, huber), 1/4 (logistic), 1/2 (cross-entropy). sigma_max(X)^2 is the
    top eigenvalue of the Gram C = X^T X or X X^T (the smaller one, k x k), formed in
    float64. An eigenvalue estimate (``eigvalsh`` for k <= EIGH_MAX, Lanczos above) can fall
    below the truth, so it is *certified*: mu I - C is factored by Cholesky for a mu slightly
    above the estimate (raised until the factorisation succeeds). A Cholesky that runs to
    completion gives R^T R = mu I - C + E with |E| <= gamma_{k+1} |R^T| |R| (Higham, Accuracy
    and Stability of Numerical Algorithms, 2nd ed., Thm 10.3; its proof needs only that the
    factorisation completes), so ||E||_2 <= gamma_{k+1} tr(R^T R) ~ gamma_{k+1} k mu and
    mu I - C + E >= 0; the float64 Gram differs from the exact one by at most gamma_d ||X||_F^2
    (d the inner dimension). Hence

        sigma_max(X)^2 <= mu (1 + 2 (k + 2)^2 eps) + 2 (d + 2) eps ||X||_F^2

    with eps the float64 machine epsilon (twice the unit roundoff, for slack). ``sigma_sq_bound``
    is that number and ``lipschitz`` is L_loss times it over N. It is computed on first use
    and kept: one Gram (N n min(N, n) / 2 multiply-adds), a Lanczos run and a Cholesky of
    min(N, n)^3 / 3.

    **The exact norm.** Three ways to ||N G||_F = ||Delta^T X||_F, each in float64 sums:
    "tiles": column tiles of Delta^T X (N m n multiply-adds in the dtype per step), each
    squared, summed and discarded; "gram": <Delta Delta^T, K> with K = X X^T (float64, N x N,
    made once; a syrk of N^2 m / 2 per step); "moments", the squared loss only: Delta = Z0 +
    X W^T is affine in W = BA, so Delta^T X = C0 + B (A Sigma) with C0 = Z0^T X and
    Sigma = X^T X formed once in float64 (``compute_moments``), and a step costs
    r n (n + m) float64 multiply-adds, not O(N m n), and needs no stored Delta. Which one
    is cheapest depends on the shape and the device (float64 products cost 2.2x float32
    ones on the CPU, the same on an H200): ``norm_costs`` prices them, ``norm_strategy_for``
    picks one. Rounding: the moments' error is about eps64 (||C0|| + ||B A Sigma||) times
    the inner sizes' growth (gamma_N, gamma_n), the tiles' about eps (||Z0|| + ||X W^T||)
    ||X|| from the dtype's Delta (eps the dtype's); near a minimiser ||N G|| is far below
    both sums, so in float32 the moments are the more accurate by about eps32 / eps64.
    They compute the norm of the true G at (B, A) (Z0 never rounded), where the tiles and
    the Gram compute the norm of Delta^T X for the Delta the sweep rounded to the dtype.

    **Theorem(norm="bound").** With ``norm="bound"`` the kernels put in ``g_sq`` the
    square of U = min(sigma ||Delta||_F / N, sqrt(2 L J)) (times 1 + BOUND_MARGIN), with sigma
    and L the certified bounds above, in place of ||G||_F. Both terms bound ||G||_F:
    ||Delta^T X||_F <= ||X||_2 ||Delta||_F, and for an L-smooth function with infimum >= 0
    (every loss here is >= 0) ||grad L(W)||^2 <= 2 L (L(W) - inf L) <= 2 L J. The bound
    costs nothing beyond the sweep, against O(N m min(N, n)) for the exact norm. A larger
    norm only makes eta_t smaller; Lemma 2's proof uses only upper bounds on eta_t
    (eqs. 18, 21-23), so J(V_{t+1}) <= J(V_t) - eta_t/5 ||grad J(V_t)||^2 still holds at every
    step, and Theorem 3's bound (10) follows by the same telescoping sum. The rate holds
    too: its proof lower-bounds eta_t by replacing ||G_t|| with sqrt(2L (J(V_t) - L*)) <=
    sqrt(2L (J(V_0) - L*)), and U <= sqrt(2 L J(V_t)) by construction (L* = 0), so the same
    D_t = O(t) bounds 1/eta_t and sum_t eta_t still grows like log T. The ||V_t||^2 growth
    bound of the proof needs only eta_t <= 1 and eta_t ||V_t||^2 <= 1/(5 sqrt(2) L), which a
    smaller eta_t keeps. The certified L is used in the bound even when ``lipschitz`` is
    given, so the bound never rests on a user's constant.

    **Pickling.** A LinearProblem pickles with X, W0 and Y (its own copies) and the
    certified ``sigma_sq_bound`` once computed: about X.nbytes + W0.nbytes + Y.nbytes. The
    Gram X X^T (up to GRAM_MAX_BYTES), the moments C0 and Sigma (up to MOMENTS_MAX_BYTES)
    and the devices' prepared data stay behind and are made again on first use
    (``KindBase``).

    Raises
    ------
    TypeError : non-float or mixed dtypes, non-array inputs, a non-integer Y for
        cross-entropy, arrays on different devices.
    ValueError : shapes that do not fit together, empty arrays, non-finite entries, an
        unknown loss, labels outside {-1, +1} (logistic) or [0, m) (cross-entropy), delta
        or lipschitz not positive and finite, delta for a loss without one, an unknown
        norm_strategy, "moments" for a loss other than "squared".
    """

    kind = "linear"
    #: the Gram (N x N float64, up to 4x X's bytes) and the moments (8 (m n + n^2) bytes):
    #: remade where the problem is unpickled
    _CACHES = KindBase._CACHES + ("gram", "moments")
    #: the exact norm's strategy the user chose, or None: the cheapest (norm_strategy_for);
    #: a class default too, so that a problem pickled before the option unpickles as "auto"
    _norm_forced: str | None = None

    def __init__(self, X, Y, W0, *, loss: str = "squared", delta: float = 1.0,
                 lipschitz: float | None = None, norm_strategy: str = "auto"):
        if not isinstance(loss, str) or loss not in LINEAR_LOSSES:
            raise ValueError(f"unknown loss {loss!r}; known losses: {sorted(LINEAR_LOSSES)}")
        self.loss = LINEAR_LOSSES[loss]
        if not isinstance(norm_strategy, str) or norm_strategy not in ("auto", *NORM_STRATEGIES):
            raise ValueError(f"unknown norm_strategy {norm_strategy!r}; known: "
                             f"{['auto', *NORM_STRATEGIES]}")
        if norm_strategy == "moments" and loss != "squared":
            raise ValueError(f"norm_strategy='moments' needs the squared loss (its Delta is "
                             f"affine in W), got loss {loss!r}")
        self._norm_forced = None if norm_strategy == "auto" else norm_strategy
        W0_in, Y_in = W0, Y
        X, W0 = as_array("X", X), as_array("W0", W0)
        Y = as_array("Y", Y, hint="dtype=np.int64" if self.loss.labels == "class"
                     else "dtype=X.dtype")
        check_matrix("X", X)
        check_matrix("W0", W0, dtype=X.dtype, like=W0_in)
        xp = array_namespace(X)
        if array_namespace(W0) is not xp or array_namespace(Y) is not xp:
            raise TypeError("X, Y and W0 must all be NumPy arrays or all CuPy arrays")
        (N, n), (m, n_w) = X.shape, W0.shape
        if N == 0 or n == 0 or m == 0:
            raise ValueError(f"X and W0 must be non-empty, got X {tuple(X.shape)} and "
                             f"W0 {tuple(W0.shape)}")
        if n_w != n:
            raise ValueError(f"W0 has {n_w} columns but X has {n}: W0 must be (m, n) = "
                             f"(outputs, inputs) with n = X.shape[1]")
        classes = self.loss.labels == "class"
        if classes:
            _check_classes(Y, N, m, xp)
        else:
            check_matrix("Y", Y, dtype=X.dtype, like=Y_in)
            if Y.shape[0] != N:
                raise ValueError(f"Y has {Y.shape[0]} rows but X has {N}: one target row "
                                 f"per sample")
            if Y.shape[1] != m:
                raise ValueError(f"Y has {Y.shape[1]} columns but W0 has {m} rows: Y must be "
                                 f"(N, m) with m = W0.shape[0]")
            if self.loss.labels and not bool(((Y == 1) | (Y == -1)).all()):
                raise ValueError(f"loss {loss!r} needs labels Y in {{-1, +1}}")
        if isinstance(delta, (bool, np.bool_)):
            raise TypeError(f"delta must be a real number > 0, got {delta!r}")
        if not self.loss.uses_delta:
            if delta is not None and not (isinstance(delta, (int, float)) and delta == 1.0):
                raise ValueError(f"delta={delta!r} was given, but loss {loss!r} has no delta "
                                 f"(only huber uses it)")
            self.delta = 1.0
        else:
            self.delta = positive_float("delta", 1.0 if delta is None else delta)
        self._lipschitz = None if lipschitz is None else positive_float("lipschitz", lipschitz)
        self.N, self.n, self.m = int(N), int(n), int(m)
        self.shape = (self.m, self.n)
        self.dtype = np.dtype(X.dtype)
        self.X = xp.ascontiguousarray(X).copy()
        self.W0 = xp.ascontiguousarray(W0).copy()
        self.Y = xp.ascontiguousarray(Y).astype(xp.int64 if classes else self.dtype, copy=True)
        self._prepared: dict = {}  # device key -> that device's copy of the data

    # -- the protocol ------------------------------------------------------------------------
    @property
    def xp(self):
        return array_namespace(self.X)

    @property
    def lipschitz(self) -> float:
        """L of grad_W J: the one given, or L_loss sigma_max(X)^2 / N certified (class notes)."""
        return self.certified_lipschitz if self._lipschitz is None else self._lipschitz

    @property
    def eta_lipschitz(self) -> float:
        """max(L, 1): the constant the paper's step size uses."""
        return max(self.lipschitz, 1.0)

    @property
    def certified_lipschitz(self) -> float:
        """L_loss sigma_max(X)^2 / N with the certified sigma_max: what the bound on ||G|| uses."""
        return self.loss.lipschitz * self.sigma_sq_bound / self.N

    def arrays(self) -> tuple:
        """The arrays whose home decides device="auto"."""
        return (self.X,)

    # -- what the kernels read -----------------------------------------------------------------
    @property
    def residual(self) -> bool:
        """True for the residual losses (squared, huber): the pass reads Z0 = X W0^T - Y."""
        return self.loss.labels is False

    def base(self, xp=None):
        """Z0 (N x m, the data's dtype): X W0^T - Y for a residual loss, else X W0^T.

        Formed in float64 and rounded once, in row blocks of about 64 MB (``xp``: the array
        namespace to compute in, default the problem's). ValueError if it overflows the dtype.
        """
        xp = self.xp if xp is None else xp
        X, W0 = xp.asarray(self.X), xp.asarray(self.W0)
        W64 = W0.astype(np.float64).T
        Z0 = xp.empty((self.N, self.m), self.dtype)
        rows = max(1, (64 << 20) // (8 * max(self.m, self.n)))
        for i in range(0, self.N, rows):
            z = X[i:i + rows].astype(np.float64) @ W64
            if self.residual:
                z -= xp.asarray(self.Y[i:i + rows])
            with np.errstate(over="ignore", invalid="ignore"):
                Z0[i:i + rows] = z
        if not bool(xp.isfinite(Z0).all()):
            what = "X W0^T - Y" if self.residual else "X W0^T"
            raise ValueError(f"{what} overflows {self.dtype} (finite inputs, infinite "
                             f"product); build the problem in float64, or rescale X and W0")
        return Z0

    @property
    def norm_strategy(self) -> str:
        """The exact norm's strategy on the CPU at rank NOMINAL_RANK: ``norm_strategy_for()``."""
        return self.norm_strategy_for("cpu")

    def norm_strategy_for(self, device: str = "cpu", rank: int = NOMINAL_RANK) -> str:
        """How a device computes the exact ||Delta^T X||_F for adapters of this rank.

        The strategy given to the constructor, or with ``norm_strategy="auto"`` the cheapest
        of ``norm_costs(device, rank)`` (a tie goes to the first of NORM_STRATEGIES). The
        passes ask with their adapters' rank: what this returns is what they use.

        Parameters
        ----------
        device : "cpu" or "cuda" (priced by COST_WEIGHTS), or "reference" or "dask" (priced
            as "cpu").
        rank : r, the adapters' rank (B is m x r).
        """
        if self._norm_forced is not None:
            return self._norm_forced
        return cheapest(self.norm_costs(device, rank))

    def norm_costs(self, device: str = "cpu", rank: int = NOMINAL_RANK) -> dict[str, float]:
        """The cost per step of each exact-norm strategy available to this problem, in float32
        multiply-adds of a BLAS product on ``device``: the module's ``norm_costs``."""
        return norm_costs(self.N, self.n, self.m, rank, self.dtype, self.loss.name, device)

    @cached_property
    def gram(self):
        """K = X X^T in float64 (N x N, the problem's array namespace), made once."""
        X64 = self.X.astype(np.float64)
        return X64 @ X64.T

    @cached_property
    def moments(self):
        """(C0, Sigma) of the "moments" norm in the problem's array namespace, made once
        (``compute_moments``)."""
        return self.compute_moments()

    def compute_moments(self, xp=None):
        """(C0, Sigma) = ((X W0^T - Y)^T X, X^T X), float64, m x n and n x n: the squared
        loss's moments. Its Delta = Z0 + X W^T is affine in W = BA, so

            N G = Delta^T X = Z0^T X + W X^T X = C0 + B (A Sigma),

        and ||N G||_F costs per step A Sigma (r n^2 multiply-adds) and B (A Sigma) (m n r),
        without Delta (the "moments" strategy, ``norm_costs``).

        Z0 = X W0^T - Y is formed in float64 from the data, row block by row block (about
        64 MB each, as in ``base``), and never rounded to the dtype. The Z0 the sweep reads
        is rounded (an error up to eps |Z0| in each entry, eps the dtype's); near a minimiser,
        where C0 and B A Sigma cancel, that error would be most of what is left of G. ``xp``:
        the array namespace to compute in, default the problem's.
        """
        if self.loss.name != "squared":
            raise ValueError(f"the moments describe the squared loss only (its Delta is "
                             f"affine in W); this problem's loss is {self.loss.name!r}")
        xp = self.xp if xp is None else xp
        X, W0 = xp.asarray(self.X), xp.asarray(self.W0)
        W64 = W0.astype(np.float64).T
        C0 = xp.zeros((self.m, self.n), np.float64)
        Sigma = xp.zeros((self.n, self.n), np.float64)
        rows = max(1, (64 << 20) // (8 * max(self.m, self.n)))
        for i in range(0, self.N, rows):
            x = X[i:i + rows].astype(np.float64)
            z = x @ W64 - xp.asarray(self.Y[i:i + rows]).astype(np.float64)  # rows of Z0
            C0 += z.T @ x
            Sigma += x.T @ x
        return C0, Sigma

    @cached_property
    def sigma_sq_bound(self) -> float:
        """A certified upper bound on sigma_max(X)^2 (see the class notes)."""
        xp = self.xp
        X64 = self.X.astype(np.float64)
        if self.N <= self.n:
            C, inner = (self.gram if self.norm_strategy == "gram" else X64 @ X64.T), self.n
        else:
            C, inner = X64.T @ X64, self.N
        fro_sq = float(xp.sum(X64 * X64))
        C = C.get() if hasattr(C, "get") else np.asarray(C)
        return _certified_sigma_sq(C, inner, fro_sq)

    def norm_bound_sq(self, d_sq, loss, xp=None):
        """U^2, the square of a certified upper bound on ||G||_F (class notes).

        d_sq = ||Delta||_F^2 and loss = J at the iterate: Python floats, or 0-d float64 arrays
        of ``xp`` (then the result is one too, computed where they live).
        """
        a = self.sigma_sq_bound * d_sq / float(self.N) ** 2  # (sigma ||Delta||_F / N)^2
        b = 2.0 * self.certified_lipschitz * loss              # 2 L J
        scale = (1.0 + BOUND_MARGIN[self.dtype]) ** 2
        if xp is None:
            return scale * min(a, b) if math.isfinite(b) else scale * a
        return scale * xp.minimum(a, xp.where(xp.isfinite(b), b, a))

    def __repr__(self):
        L = "certified" if self._lipschitz is None else f"{self._lipschitz:g}"
        return (f"LinearProblem(X {self.N}x{self.n}, W0 {self.m}x{self.n} {self.dtype}, "
                f"loss={self.loss.name!r}, L={L})")


def norm_costs(N: int, n: int, m: int, r: int, dtype, loss: str, device: str = "cpu") -> dict:
    """The cost per step of each exact-norm strategy available, in float32 multiply-adds of a
    BLAS product on ``device`` (COST_WEIGHTS: w32, w64 per multiply-add, wb per byte).

    The sweep (the same for all) is left out. With s the dtype's bytes, w = w32 for float32
    data and w64 for float64, and the one-time products divided by T = AMORTISE_STEPS:

        tiles    w N m n                        Delta^T X, one column tile at a time
                 + wb (2 s N m + s N n)         Delta stored by the sweep and read; X read
        gram     w N^2 m / 2                    Delta Delta^T (a syrk)
                 + wb (2 s N m + (2 s + 8) N^2) Delta stored and read; Delta Delta^T
                                                written and read, K = X X^T read
                 + w64 N^2 n / 2 / T            K, once
        moments  w64 r n (n + m)                A Sigma, then B (A Sigma) in row tiles
                 + wb 8 (n^2 + 3 m n)           Sigma read; C0 read, each tile written, read
                 + w64 (2 N m n + N n^2 / 2) / T  Z0 = X W0^T - Y, C0 = Z0^T X and
                                                Sigma = X^T X (a syrk) in float64, once

    Available: tiles always; gram while 16 N^2 bytes fit GRAM_MAX_BYTES; moments for the
    squared loss (the only one whose Delta is affine in W) while 8 (m n + n^2) bytes fit
    MOMENTS_MAX_BYTES. Only products and bytes count: at the sizes where the choice matters
    (m, n in the thousands) the rest is small beside them.
    """
    kind = COST_ALIASES.get(device, device)
    if kind not in COST_WEIGHTS:
        raise ValueError(f"no cost weights for device {device!r}; known: "
                         f"{sorted(COST_WEIGHTS) + sorted(COST_ALIASES)}")
    c = COST_WEIGHTS[kind]
    s = np.dtype(dtype).itemsize
    w = c.mac32 if s == 4 else c.mac64
    N, n, m, r = float(N), float(n), float(m), float(r)  # no integer overflow, no rounding
    T = float(AMORTISE_STEPS)
    costs = {}
    if loss == "squared" and 8 * (m * n + n * n) <= MOMENTS_MAX_BYTES:
        costs["moments"] = (c.mac64 * r * n * (n + m) + c.byte * 8 * (n * n + 3 * m * n)
                            + c.mac64 * (2 * N * m * n + N * n * n / 2) / T)
    if 16 * N * N <= GRAM_MAX_BYTES:
        costs["gram"] = (w * N * N * m / 2 + c.byte * (2 * s * N * m + (2 * s + 8) * N * N)
                         + c.mac64 * N * N * n / 2 / T)
    costs["tiles"] = w * N * m * n + c.byte * (2 * s * N * m + s * N * n)
    return costs


def cheapest(costs: dict) -> str:
    """The strategy of least cost in ``norm_costs``'s answer; a tie goes to the first of
    NORM_STRATEGIES."""
    return min(costs, key=lambda name: (costs[name], NORM_STRATEGIES.index(name)))


def _check_classes(Y, N, m, xp):
    """Y: an (N,) integer array of class indices in [0, m)."""
    reject_masked("Y", Y)
    dtype = getattr(Y, "dtype", None)
    if dtype is None or not hasattr(Y, "shape"):
        raise TypeError(f"Y must be an (N,) integer array of class indices for "
                        f"cross_entropy, got {type(Y).__name__}")
    # the fix that matches the array given: one-hot (or probability) rows -> their argmax
    one_hot = Y.ndim == 2 and Y.shape[1] == m
    fix = ("if its rows are one-hot (or class probabilities) pass Y.argmax(axis=1), the class "
           "index of each row" if one_hot else
           "convert it with Y.astype(np.int64) if it holds whole numbers" if Y.ndim == 1 else
           "pass an (N,) integer array of class indices")
    if dtype.kind not in "iu":
        raise TypeError(f"Y must hold integer class indices for cross_entropy, got dtype "
                        f"{dtype} of shape {tuple(Y.shape)}; {fix}")
    if Y.ndim != 1:
        raise ValueError(f"Y must be 1-D (one class index per sample) for cross_entropy, "
                         f"got shape {tuple(Y.shape)}; {fix}")
    if Y.shape[0] != N:
        raise ValueError(f"Y has {Y.shape[0]} labels but X has {N} rows: one label per sample")
    lo, hi = int(Y.min()), int(Y.max())
    if lo < 0 or hi >= m:
        raise ValueError(f"Y holds class indices in [{lo}, {hi}], outside [0, {m}) "
                         f"(m = W0.shape[0] = {m} classes)")


def _top_eigenvalue(C) -> float:
    """An estimate of the top eigenvalue of the symmetric PSD C (may fall a little below it):
    ``eigvalsh`` up to EIGH_MAX, else Lanczos with full reorthogonalisation (its top Ritz value,
    once it changes by less than 1e-12 between checks; 4096 x 4096 takes about 60 products)."""
    k = C.shape[0]
    if k <= EIGH_MAX:
        return float(np.linalg.eigvalsh(C)[-1])
    steps = min(k, LANCZOS_STEPS)
    Q = np.zeros((steps + 1, k))
    q = np.random.default_rng(0).standard_normal(k)
    Q[0] = q / np.linalg.norm(q)
    alpha, beta, top = [], [], 0.0
    for j in range(steps):
        w = C @ Q[j]
        alpha.append(float(Q[j] @ w))
        for _ in range(2):  # full reorthogonalisation against every Lanczos vector so far
            w -= Q[:j + 1].T @ (Q[:j + 1] @ w)
        b = float(np.linalg.norm(w))
        if (j + 1) % 10 == 0 or j + 1 == steps or b <= 1e-14 * abs(alpha[-1]):
            T = np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1)
            ritz = float(np.linalg.eigvalsh(T)[-1])
            if b <= 1e-14 * abs(alpha[-1]) or abs(ritz - top) <= 1e-12 * abs(ritz):
                return ritz
            top = ritz
        beta.append(b)
        Q[j + 1] = w / b
    return top


def _certified_sigma_sq(C, inner: int, fro_sq: float) -> float:
    """An upper bound on lambda_max of the exact Gram whose float64 rounding is C (k x k).

    mu I - C is factored by Cholesky for mu just above the estimate, raised until the
    factorisation runs to completion; then the margins of the class notes are added.
    """
    k = C.shape[0]
    diag_max = float(np.max(np.diag(C)))
    if diag_max == 0.0:
        return 0.0  # X = 0: C = 0 exactly (no rounding in sums of zeros)
    mu = max(_top_eigenvalue(C), diag_max / k) * (1.0 + 2.0 ** -20)
    step = 2.0 ** -16
    eye = np.eye(k)
    while True:
        try:
            np.linalg.cholesky(mu * eye - C)
            break
        except np.linalg.LinAlgError:
            mu *= 1.0 + step
            step = min(step * 16.0, 1.0)
    return mu * (1.0 + 2.0 * (k + 2) ** 2 * _EPS64) + 2.0 * (inner + 2) * _EPS64 * fro_sq
