"""Warp-level instructions in the host emulation (lorakern/_cuda/warp.cuh, emulation.h): the
TF32 conversion bit for bit, the 3xTF32 split and its accuracy, the mma fragments against the
PTX ISA's tables, and warp collectives that fail when a warp diverges.

The mma's accumulation is not specified by the PTX ISA (it need not be IEEE round-to-nearest),
so every mma test runs under both policies of the emulation ("rn": the exact sum rounded to
nearest even; "rz": truncated), and holds under both. Inputs are small integers where results
must match NumPy bit for bit (exact under any rounding), random otherwise, judged against
float64 by the rule of the issue's goals: within max(1e-6, 20 x the error of a plain fp32 FMA
kernel). On a GPU, benchmarks/gpu_probe.py checks cvt.rna.tf32 and the layouts against these
same models.
"""
from __future__ import annotations

import numpy as np
import pytest

from lorakern._cuda import emulation, launch
from lorakern._cuda.emulation import EmulationError, HostRuntime

pytestmark = pytest.mark.skipif(not emulation.available(), reason="g++ not found")

dev = emulation.XP

KERNELS = r"""
using namespace lorakern::warp;

// out[i] = cvt.rna.tf32.f32(in[i]) (bits); big[i], small[i]: the 3xTF32 split
__global__ void convert(const float* in, unsigned* out, unsigned* big, unsigned* small, int n)
{
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        out[i] = cvt_rna_tf32(in[i]);
        const Tf32Split s = split_tf32(in[i]);
        big[i] = s.big;
        small[i] = s.small;
    }
}

// every (lane, register) -> (row, column) of both shapes' A, B, C, from the coordinate functions
__global__ void coordinates(int* out)
{
    const unsigned lane = threadIdx.x;
    typedef FragM16N8K8Tf32 F;
    typedef FragM8N8K4F64 G;
    for (int i = 0; i < 4; ++i) { out[(lane * 4 + i) * 2] = F::a(lane, i).row; out[(lane * 4 + i) * 2 + 1] = F::a(lane, i).col; }
    for (int i = 0; i < 2; ++i) { out[256 + (lane * 2 + i) * 2] = F::b(lane, i).row; out[256 + (lane * 2 + i) * 2 + 1] = F::b(lane, i).col; }
    for (int i = 0; i < 4; ++i) { out[384 + (lane * 4 + i) * 2] = F::c(lane, i).row; out[384 + (lane * 4 + i) * 2 + 1] = F::c(lane, i).col; }
    out[640 + lane * 2] = G::a(lane, 0).row; out[640 + lane * 2 + 1] = G::a(lane, 0).col;
    out[704 + lane * 2] = G::b(lane, 0).row; out[704 + lane * 2 + 1] = G::b(lane, 0).col;
    for (int i = 0; i < 2; ++i) { out[768 + (lane * 2 + i) * 2] = G::c(lane, i).row; out[768 + (lane * 2 + i) * 2 + 1] = G::c(lane, i).col; }
}

// D = A B + C for one m16n8k8 tile (row-major A 16x8, B 8x8, C and D 16x8) in each warp;
// convert: cvt.rna.tf32 the operands (else their bits as they are); wrong: load A with a0/a1
// and a2/a3 swapped (a layout bug)
__global__ void mma_tf32(const float* A, const float* B, const float* C, float* D, int convert, int wrong)
{
    typedef FragM16N8K8Tf32 F;
    const unsigned lane = threadIdx.x % 32;
    unsigned a[4], b[2];
    float c[4], d[4];
    for (int i = 0; i < 4; ++i) {
        const RowCol rc = F::a(lane, wrong ? i ^ 1 : i);
        const float x = A[rc.row * 8 + rc.col];
        a[i] = convert ? cvt_rna_tf32(x) : __float_as_uint(x);
    }
    for (int i = 0; i < 2; ++i) {
        const RowCol rc = F::b(lane, i);
        const float x = B[rc.row * 8 + rc.col];
        b[i] = convert ? cvt_rna_tf32(x) : __float_as_uint(x);
    }
    for (int i = 0; i < 4; ++i) c[i] = C[F::c(lane, i).row * 8 + F::c(lane, i).col];
    mma_m16n8k8_tf32(d, a, b, c);
    for (int i = 0; i < 4; ++i) D[F::c(lane, i).row * 8 + F::c(lane, i).col] = d[i];
}

// D = A B + C for one m8n8k4 f64 tile (row-major A 8x4, B 4x8, C and D 8x8); wrong: B loaded
// as if it were row-indexed by the group (a layout bug)
__global__ void mma_f64(const double* A, const double* B, const double* C, double* D, int wrong)
{
    typedef FragM8N8K4F64 F;
    const unsigned lane = threadIdx.x % 32;
    const RowCol ra = F::a(lane, 0), rb = F::b(lane, 0);
    const double a = A[ra.row * 4 + ra.col];
    const double b = wrong ? B[((lane >> 2) % 4) * 8 + (lane & 3)] : B[rb.row * 8 + rb.col];  // wrong: (g, t)
    double c[2], d[2];
    for (int i = 0; i < 2; ++i) c[i] = C[F::c(lane, i).row * 8 + F::c(lane, i).col];
    mma_m8n8k4_f64(d, a, b, c);
    for (int i = 0; i < 2; ++i) D[F::c(lane, i).row * 8 + F::c(lane, i).col] = d[i];
}

// D (16 x 8) = A (16 x K) B (K x 8) in k8 steps, one accumulator: mode 0 1xTF32 (big only),
// 1 3xTF32 (the two small products first, then big x big)
__global__ void gemm_tf32(const float* A, const float* B, float* D, int K, int mode)
{
    typedef FragM16N8K8Tf32 F;
    const unsigned lane = threadIdx.x % 32;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int k0 = 0; k0 < K; k0 += 8) {
        unsigned ab[4], as[4], bb[2], bs[2];
        for (int i = 0; i < 4; ++i) {
            const Tf32Split s = split_tf32(A[F::a(lane, i).row * K + k0 + F::a(lane, i).col]);
            ab[i] = s.big;
            as[i] = s.small;
        }
        for (int i = 0; i < 2; ++i) {
            const Tf32Split s = split_tf32(B[(k0 + F::b(lane, i).row) * 8 + F::b(lane, i).col]);
            bb[i] = s.big;
            bs[i] = s.small;
        }
        if (mode == 1) {
            mma_m16n8k8_tf32(acc, as, bb, acc);
            mma_m16n8k8_tf32(acc, ab, bs, acc);
        }
        mma_m16n8k8_tf32(acc, ab, bb, acc);
    }
    for (int i = 0; i < 4; ++i) D[F::c(lane, i).row * 8 + F::c(lane, i).col] = acc[i];
}

// the same product by plain fp32 FMA, one output per thread, k in order
__global__ void gemm_fma(const float* A, const float* B, float* D, int K)
{
    const int t = threadIdx.x;
    if (t >= 128) return;
    float s = 0.0f;
    for (int k = 0; k < K; ++k) s = __fmaf_rn(A[(t / 8) * K + k], B[k * 8 + t % 8], s);
    D[t] = s;
}

// mma called by part of a warp, or from two call sites, or with a lane at a barrier
__global__ void divergent_mma(float* out, int mode)
{
    const unsigned lane = threadIdx.x % 32;
    unsigned a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
    float c[4] = {1.0f, 1.0f, 1.0f, 1.0f}, d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (mode == 0) {
        mma_m16n8k8_tf32(d, a, b, c);
    } else if (mode == 1) {
        if (lane < 16) mma_m16n8k8_tf32(d, a, b, c);
    } else if (mode == 2) {
        if (lane % 2) {
            mma_m16n8k8_tf32(d, a, b, c);
        } else {
            mma_m16n8k8_tf32(d, a, b, c);
        }
    } else if (mode == 3) {
        if (lane != 5) mma_m16n8k8_tf32(d, a, b, c);
        __syncthreads();
    } else {
        a[1] = __float_as_uint(1.0f + 1e-6f);  // not a .tf32 value: no cvt
        mma_m16n8k8_tf32(d, a, b, c);
    }
    out[threadIdx.x] = d[0];
}

// a butterfly sum over each warp, with a barrier between two rounds
__global__ void warp_sum(const float* in, float* out)
{
    float v = in[threadIdx.x];
    for (int o = 16; o >= 4; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    for (int o = 2; o >= 1; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    out[threadIdx.x] = v;
}

// shuffles with partial masks: 0 lanes 0-15 with their own mask (legal); 1 lane 16 joins with a
// mask that leaves it out; 2 lanes 0-15 with the full mask (divergent); 3 a source lane outside
// the mask (undefined: poison); 4 two halves at two sites with two masks (legal); 5 __syncwarp
// skipped by half the warp; 6 shfl_down past the end returns the lane's own value
__global__ void shfl_masks(float* out, int mode)
{
    const unsigned lane = threadIdx.x % 32;
    const float v = 100.0f + (float)lane;
    float r = -1.0f;
    if (mode == 0) {
        if (lane < 16) r = __shfl_sync(0x0000ffffu, v, 3);
    } else if (mode == 1) {
        if (lane <= 16) r = __shfl_sync(0x0000ffffu, v, 3);
    } else if (mode == 2) {
        if (lane < 16) r = __shfl_sync(0xffffffffu, v, 3);
    } else if (mode == 3) {
        if (lane < 16) r = __shfl_sync(0x0000ffffu, v, 20);
    } else if (mode == 4) {
        if (lane < 16) {
            r = __shfl_sync(0x0000ffffu, v, 3);
        } else {
            r = __shfl_sync(0xffff0000u, v, 20);
        }
    } else if (mode == 5) {
        if (lane < 16) __syncwarp();
        r = v;
    } else {
        r = __shfl_down_sync(0xffffffffu, v, 4);
    }
    out[threadIdx.x] = r;
}
"""

NAMES = ("convert", "coordinates", "mma_tf32", "mma_f64", "gemm_tf32", "gemm_fma", "divergent_mma",
         "warp_sum", "shfl_masks")
POLICIES = ("rn", "rz", "aligned")  # emulation.MMA_ROUNDING: the accumulation models


@pytest.fixture(scope="module")
def runtimes():
    """One runtime per accumulation policy (same modules: same flags, same cache)."""
    return {p: HostRuntime(timeout=2.0, mma_rounding=p) for p in POLICIES}


@pytest.fixture(scope="module")
def kernels(runtimes):
    """The kernels of each runtime (module source: warp.cuh, then KERNELS)."""
    out = {}
    for policy, rt in runtimes.items():
        module = rt.module(launch.warp_source() + KERNELS, NAMES)
        out[policy] = {name: rt.kernel(module, name, 0) for name in NAMES}
    return out


def line_of(text: str) -> int:
    """The line of the module (warp.cuh, then KERNELS) that holds `text`, as messages name it."""
    source = launch.warp_source() + KERNELS
    assert source.count(text) == 1, text
    return source[:source.index(text)].count("\n") + 1


def run(runtimes, kernels, policy, name, args, threads=32):
    runtimes[policy].launch(kernels[policy][name], 1, args, block=threads)


# ---- cvt.rna.tf32.f32 -------------------------------------------------------------------------
#: (input bits, cvt.rna.tf32.f32 bits), worked out by hand: keep the sign, the exponent and the
#: top 10 mantissa bits; the 13 dropped bits >= 0x1000 round the magnitude up (ties away from 0)
CVT_CASES = [
    (0x3F800000, 0x3F800000),  # 1.0: exact
    (0x3F800FFF, 0x3F800000),  # just below half: down
    (0x3F801000, 0x3F802000),  # a tie, the kept bit even: away from zero (to even would go down)
    (0xBF801000, 0xBF802000),  # the negative tie: away from zero too
    (0x3F803000, 0x3F804000),  # a tie, the kept bit odd: up
    (0x3F801001, 0x3F802000),  # just above half: up
    (0x3FFFFFFF, 0x40000000),  # the carry goes into the exponent: 2.0
    (0x7F7FEFFF, 0x7F7FE000),  # large, below half: down
    (0x7F7FFFFF, 0x7F800000),  # the largest float rounds to inf
    (0xFF7FFFFF, 0xFF800000),  # and its negative to -inf
    (0x00001000, 0x00002000),  # a subnormal tie: away from zero
    (0x00000FFF, 0x00000000),  # a subnormal below half: +0
    (0x80000FFF, 0x80000000),  # its negative: -0
    (0x807FFFFF, 0x80800000),  # the largest negative subnormal: up to the smallest normal
    (0x00000000, 0x00000000),
    (0x80000000, 0x80000000),
    (0x7F800000, 0x7F800000),  # inf
    (0xFF800000, 0xFF800000),  # -inf
]
NAN_INPUTS = [0x7FC00000, 0x7F800001, 0xFF801FFF, 0x7FFFE000]  # quiet, signalling (low payload)


def convert(runtimes, kernels, bits):
    x = dev.asarray(np.asarray(bits, np.uint32).view(np.float32))
    out, big, small = (dev.zeros(x.size, np.uint32) for _ in range(3))
    run(runtimes, kernels, "rn", "convert", (x, out, big, small, np.int32(x.size)), threads=64)
    return out.get(), big.get(), small.get()


def test_cvt_rna_tf32_hand_cases(runtimes, kernels):
    inputs = [i for i, _ in CVT_CASES]
    expected = np.array([e for _, e in CVT_CASES], np.uint32)
    got, _, _ = convert(runtimes, kernels, inputs)
    for i, g, e in zip(inputs, got, expected):
        assert g == e, f"cvt.rna.tf32(0x{i:08x}) = 0x{g:08x}, expected 0x{e:08x}"
    np.testing.assert_array_equal(emulation.tf32_rna_bits(np.array(inputs, np.uint32).view(np.float32)), expected)


def test_cvt_rna_tf32_nan_stays_nan(runtimes, kernels):
    """A NaN whose payload is only in the dropped bits must not become inf."""
    got, _, _ = convert(runtimes, kernels, NAN_INPUTS)
    assert np.isnan(got.view(np.float32)).all()
    assert np.isnan(emulation.tf32_rna(np.array(NAN_INPUTS, np.uint32).view(np.float32))).all()


def test_cvt_rna_tf32_random_bits_agree_with_the_numpy_model(runtimes, kernels):
    rng = np.random.default_rng(22)
    bits = rng.integers(0, 2**32, 4099, dtype=np.uint64).astype(np.uint32)
    bits[:512] = (bits[:512] & 0xFFFFE000) | 0x1000  # ties
    got, _, _ = convert(runtimes, kernels, bits)
    model = emulation.tf32_rna_bits(bits.view(np.float32))
    nan = np.isnan(bits.view(np.float32))
    np.testing.assert_array_equal(got[~nan], model[~nan])
    assert np.isnan(got[nan].view(np.float32)).all()
    assert (got[~nan] & 0x1FFF == 0).all()


def test_split_tf32(runtimes, kernels):
    """big and small are TF32 values, x - big is exact, and |x - big - small| <= 2^-22 |x|."""
    rng = np.random.default_rng(7)
    x = np.concatenate([rng.standard_normal(1000), rng.uniform(-1, 1, 997) * 1e-30,
                        rng.standard_normal(500) * 1e30]).astype(np.float32)
    _, big, small = convert(runtimes, kernels, x.view(np.uint32))
    assert (big & 0x1FFF == 0).all() and (small & 0x1FFF == 0).all()
    b, s = big.view(np.float32).astype(np.float64), small.view(np.float32).astype(np.float64)
    x64 = x.astype(np.float64)
    assert (np.abs(x64 - b - s) <= 2.0**-22 * np.abs(x64)).all()
    assert (np.abs(x64 - b) <= 2.0**-11 * np.abs(x64)).all()
    model_big, model_small = emulation.split_tf32(x)
    np.testing.assert_array_equal(model_big.view(np.uint32), big)
    np.testing.assert_array_equal(model_small.view(np.uint32), small)


# ---- fragments --------------------------------------------------------------------------------
def isa_tables():
    """The PTX ISA's fragment tables, transcribed from its text (not from warp.cuh):
    "Matrix Fragments for mma.m16n8k8" (.tf32) and "... mma.m8n8k4 with .f64"."""
    A, B, C, A64, B64, C64 = [], [], [], [], [], []
    for lane in range(32):
        g, t = lane >> 2, lane % 4
        A += [(g, t), (g + 8, t), (g, t + 4), (g + 8, t + 4)]
        B += [(t, g), (t + 4, g)]
        C += [(g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1)]
        A64 += [(g, t)]
        B64 += [(t, g)]
        C64 += [(g, 2 * t), (g, 2 * t + 1)]
    return [np.array(m) for m in (A, B, C, A64, B64, C64)]


def test_fragment_coordinates_match_the_isa_and_cover_each_matrix_once(runtimes, kernels):
    out = dev.zeros(896, np.int32)
    run(runtimes, kernels, "rn", "coordinates", (out,))
    got = out.get().reshape(-1, 2)
    pieces = np.split(got, np.cumsum([128, 64, 128, 32, 32])[:5])
    shapes = [(16, 8), (8, 8), (16, 8), (8, 4), (4, 8), (8, 8)]
    for piece, table, shape in zip(pieces, isa_tables(), shapes):
        np.testing.assert_array_equal(piece, table)
        flat = piece[:, 0] * shape[1] + piece[:, 1]
        assert sorted(flat) == list(range(shape[0] * shape[1])), "not a bijection"


def integer_case(rng, m, n, k, dtype):
    A = rng.integers(-8, 9, (m, k)).astype(dtype)
    B = rng.integers(-8, 9, (k, n)).astype(dtype)
    C = rng.integers(-64, 65, (m, n)).astype(dtype)
    return A, B, C


@pytest.mark.parametrize("policy", POLICIES)
def test_mma_tf32_on_integers_equals_numpy(runtimes, kernels, policy):
    """Exact under any rounding: a layout bug or a wrong product shows in every case."""
    rng = np.random.default_rng(1)
    for convert_ in (1, 0):
        A, B, C = integer_case(rng, 16, 8, 8, np.float32)
        D = dev.zeros((16, 8), np.float32)
        run(runtimes, kernels, policy, "mma_tf32", tuple(map(dev.asarray, (A, B, C))) + (D, np.int32(convert_), np.int32(0)))
        np.testing.assert_array_equal(D.get(), A @ B + C)
    # one-hot rows of A times an arange B: row i of D is the row of B that A's 1 selects
    A = np.eye(16, 8, dtype=np.float32)
    B = np.arange(64, dtype=np.float32).reshape(8, 8)
    D = dev.zeros((16, 8), np.float32)
    run(runtimes, kernels, policy, "mma_tf32", (dev.asarray(A), dev.asarray(B), dev.zeros((16, 8), np.float32), D,
                                                 np.int32(1), np.int32(0)))
    np.testing.assert_array_equal(D.get(), A @ B)


def test_converted_nan_and_inf_operands_propagate(runtimes, kernels):
    """cvt.rna.tf32 of a NaN is 0x7fffffff (13 low bits set): a converted operand all the same,
    so the mma takes it (NaN out, no error), as 3xTF32's small half of an inf (inf - inf) is."""
    A, B, C = integer_case(np.random.default_rng(6), 16, 8, 8, np.float32)
    A[3, 2], B[1, 5] = np.nan, np.inf
    D = dev.zeros((16, 8), np.float32)
    run(runtimes, kernels, "rn", "mma_tf32", tuple(map(dev.asarray, (A, B, C))) + (D, np.int32(1), np.int32(0)))
    with np.errstate(invalid="ignore"):
        want = A.astype(np.float64) @ B.astype(np.float64) + C
    np.testing.assert_array_equal(np.isnan(D.get()), np.isnan(want))
    np.testing.assert_array_equal(D.get()[~np.isnan(want)], want[~np.isnan(want)].astype(np.float32))


def test_a_wrong_tf32_layout_fails(runtimes, kernels):
    A, B, C = integer_case(np.random.default_rng(2), 16, 8, 8, np.float32)
    D = dev.zeros((16, 8), np.float32)
    run(runtimes, kernels, "rn", "mma_tf32", tuple(map(dev.asarray, (A, B, C))) + (D, np.int32(1), np.int32(1)))
    assert not np.array_equal(D.get(), A @ B + C)


@pytest.mark.parametrize("policy", POLICIES)
def test_mma_f64_on_integers_and_random_data(runtimes, kernels, policy):
    rng = np.random.default_rng(3)
    A, B, C = integer_case(rng, 8, 8, 4, np.float64)
    D = dev.zeros((8, 8), np.float64)
    run(runtimes, kernels, policy, "mma_f64", tuple(map(dev.asarray, (A, B, C))) + (D, np.int32(0)))
    np.testing.assert_array_equal(D.get(), A @ B + C)
    A, B, C = rng.standard_normal((8, 4)), rng.standard_normal((4, 8)), rng.standard_normal((8, 8))
    run(runtimes, kernels, policy, "mma_f64", tuple(map(dev.asarray, (A, B, C))) + (D, np.int32(0)))
    exact = (A.astype(np.longdouble) @ B.astype(np.longdouble) + C).astype(np.float64)
    # rounded once: within one ulp of the exact sum (long double is exact enough to see it);
    # aligned: each of the K + 1 terms may lose up to one ulp of the largest term first
    limit = np.spacing(np.abs(exact))
    if policy == "aligned":
        largest = np.maximum(np.abs(C), np.abs(A[:, :, None] * B[None, :, :]).max(axis=1))
        limit = limit + (A.shape[1] + 1) * np.spacing(largest)
    assert (np.abs(D.get() - exact) <= limit).all()


def test_a_wrong_f64_layout_fails(runtimes, kernels):
    A, B, C = integer_case(np.random.default_rng(4), 8, 8, 4, np.float64)
    D = dev.zeros((8, 8), np.float64)
    run(runtimes, kernels, "rn", "mma_f64", tuple(map(dev.asarray, (A, B, C))) + (D, np.int32(1)))
    assert not np.array_equal(D.get(), A @ B + C)


def test_the_roundings_differ_where_they_should(runtimes, kernels):
    """Row 0: 1 + (2^-12)(2^-12 + 2^-18) = 1 + 2^-24 + 2^-30: to nearest 1 + 2^-23, toward zero
    1, aligned 1 (the product truncated at 1's last bit, 2^-23). Row 1: 1 + 2^-24 + 2^-24 =
    1 + 2^-23 exactly: RN and RZ keep it, aligned drops both products (each below 2^-23)."""
    A = np.zeros((16, 8), np.float32)
    B = np.zeros((8, 8), np.float32)
    A[0, 0], B[0, 0] = 2.0**-12, 2.0**-12 + 2.0**-18
    A[1, 1], A[1, 2], B[1, 0], B[2, 0] = 2.0**-12, 2.0**-12, 2.0**-12, 2.0**-12
    C = np.ones((16, 8), np.float32)
    got = {}
    for policy in POLICIES:
        D = dev.zeros((16, 8), np.float32)
        run(runtimes, kernels, policy, "mma_tf32", tuple(map(dev.asarray, (A, B, C))) + (D, np.int32(0), np.int32(0)))
        got[policy] = (D.get()[0, 0], D.get()[1, 0])
    one, above = np.float32(1.0), np.float32(1 + 2.0**-23)
    assert got == {"rn": (above, above), "rz": (one, above), "aligned": (one, one)}
    A64, B64, C64 = np.zeros((8, 4)), np.zeros((4, 8)), np.ones((8, 8))
    A64[0, 0], B64[0, 0] = 1 + 2.0**-27, 2.0**-53
    A64[1, 1], A64[1, 2], B64[1, 0], B64[2, 0] = 2.0**-27, 2.0**-27, 2.0**-26, 2.0**-26  # 2 x 2^-53
    for policy, expected in (("rn", (1 + 2.0**-52, 1 + 2.0**-52)), ("rz", (1.0, 1 + 2.0**-52)),
                             ("aligned", (1.0, 1.0))):
        D = dev.zeros((8, 8), np.float64)
        run(runtimes, kernels, policy, "mma_f64", tuple(map(dev.asarray, (A64, B64, C64))) + (D, np.int32(0)))
        assert (D.get()[0, 0], D.get()[1, 0]) == expected, policy


# ---- 3xTF32 against plain fp32 ------------------------------------------------------------------
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("K, scale", [(8, 1.0), (64, 1.0), (136, 1e-3)])
def test_3xtf32_is_as_accurate_as_fp32_fma(runtimes, kernels, policy, K, scale):
    """Against float64: 3xTF32 within max(1e-6, 20 x the fp32 FMA kernel's error); 1xTF32
    far outside it (so the check can fail)."""
    rng = np.random.default_rng(K)
    A = (rng.standard_normal((16, K)) * scale).astype(np.float32)
    B = rng.standard_normal((K, 8)).astype(np.float32)
    ref = A.astype(np.float64) @ B.astype(np.float64)
    size = np.abs(ref).max()
    errors = {}
    for mode, name in ((0, "1xtf32"), (1, "3xtf32")):
        D = dev.zeros((16, 8), np.float32)
        run(runtimes, kernels, policy, "gemm_tf32", (dev.asarray(A), dev.asarray(B), D, np.int32(K), np.int32(mode)))
        errors[name] = np.abs(D.get() - ref).max() / size
    D = dev.zeros((16, 8), np.float32)
    run(runtimes, kernels, policy, "gemm_fma", (dev.asarray(A), dev.asarray(B), D, np.int32(K)), threads=128)
    errors["fma"] = np.abs(D.get() - ref).max() / size
    bound = max(1e-6, 20 * errors["fma"])
    assert errors["3xtf32"] <= bound, errors
    assert errors["1xtf32"] > bound, errors
    assert 0 < errors["fma"] < 1e-5, errors  # the reference kernel is fp32, not exact


# ---- collectives --------------------------------------------------------------------------------
def test_warp_sum_over_two_warps_and_a_barrier(runtimes, kernels):
    x = np.random.default_rng(5).integers(-100, 100, 64).astype(np.float32)
    out = dev.zeros(64, np.float32)
    run(runtimes, kernels, "rn", "warp_sum", (dev.asarray(x), out), threads=64)
    np.testing.assert_array_equal(out.get(), np.repeat(x.reshape(2, 32).sum(axis=1), 32))


@pytest.mark.parametrize("mode, match", [
    (1, r"divergent warp: lane 0 .* at mma.sync.aligned.m16n8k8.* waits for lane 16, which has reached the end"),
    (2, r"divergent warp: lane 0 .* at mma.sync.aligned.m16n8k8.* at module:{else_line} with mask 0xffffffff "
        r"waits for lane 1, which waits at mma.sync.aligned.m16n8k8.* at module:{if_line} "),
    (3, r"divergent warp: lane 0 .* waits for lane 5, which waits at __syncthreads\(\)"),
    (4, r"lane \d+'s a1 = 0x3f800008 is not a .tf32 value"),
])
def test_divergent_or_unconverted_mma_fails(runtimes, kernels, mode, match):
    """The two branches of mode 2 call the same mma on two lines: the message names both."""
    match = match.format(if_line=line_of("mma_m16n8k8_tf32(d, a, b, c);\n        } else {"),
                         else_line=line_of("mma_m16n8k8_tf32(d, a, b, c);\n        }\n    } else if (mode == 3)"))
    out = dev.zeros(32, np.float32)
    run(runtimes, kernels, "rn", "divergent_mma", (out, np.int32(0)))
    assert (out.get() == 1.0).all()  # the whole warp, converted operands: fine
    with pytest.raises(EmulationError, match=match):
        run(runtimes, kernels, "rn", "divergent_mma", (out, np.int32(mode)))


def shfl(runtimes, kernels, mode):
    out = dev.zeros(32, np.float32)
    run(runtimes, kernels, "rn", "shfl_masks", (out, np.int32(mode)))
    return out.get()


def test_shuffles_with_partial_masks(runtimes, kernels):
    got = shfl(runtimes, kernels, 0)
    np.testing.assert_array_equal(got, [103.0] * 16 + [-1.0] * 16)
    got = shfl(runtimes, kernels, 4)  # two groups, two sites, two masks
    np.testing.assert_array_equal(got, [103.0] * 16 + [120.0] * 16)
    got = shfl(runtimes, kernels, 3)  # lane 20 is not in the mask: undefined, here NaN
    assert np.isnan(got[:16]).all()
    got = shfl(runtimes, kernels, 6)  # shfl_down past the warp's end: the lane's own value
    lanes = np.arange(32)
    np.testing.assert_array_equal(got, 100.0 + np.where(lanes + 4 < 32, lanes + 4, lanes))


@pytest.mark.parametrize("mode, match", [
    (1, r"lane 16 .* at __shfl_sync.* calls it with mask 0x0000ffff, which leaves out the calling lane"),
    (2, r"divergent warp: lane 0 .* __shfl_sync.* with mask 0xffffffff waits for lane 16, which has reached "
        r"the end of the kernel"),
    (5, r"divergent warp: lane 0 .* __syncwarp\(\).* waits for lane 16"),
])
def test_divergent_shuffles_fail(runtimes, kernels, mode, match):
    with pytest.raises(EmulationError, match=match):
        shfl(runtimes, kernels, mode)
