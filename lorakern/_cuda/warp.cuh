// Warp-level instructions for tensor-core kernels: the TF32 conversion and the 3xTF32 split,
// the mma fragments of the PTX ISA as coordinate functions, and one wrapper per mma shape.
//
// Not used by fused.cu yet: this is the groundwork of the proposed tensor-core step
// (shared/design/cuda-floor.md), checked on the host (tests/test_cuda_warp.py) and, on a GPU,
// against the hardware by benchmarks/gpu_probe.py. Each wrapper has three branches: the PTX
// instruction (sm_80 and later), the host emulation's model (emulation.h: the 32 lanes meet,
// their fragments are gathered through the same coordinate functions, the result is computed
// and scattered back), and a trap anywhere else: never a silent fallback.
//
// A module that uses it is this text, then the kernels (launch.warp_source()).
#ifndef LORAKERN_WARP_CUH
#define LORAKERN_WARP_CUH

#if defined(LORAKERN_HOST_EMULATION)
#define LK_CALL_SITE , const char *file_ = __builtin_FILE(), int line_ = __builtin_LINE()
#else
#define LK_CALL_SITE
#endif

namespace lorakern {
namespace warp {

typedef unsigned int u32;

struct RowCol {
    int row, col;
};

// ---- fragments: (lane, register) -> (row, column) of the warp's matrix -------------------------
// PTX ISA, "Matrix Fragments for mma.m16n8k8", .tf32 A and B, .f32 C and D
// (https://docs.nvidia.com/cuda/parallel-thread-execution/#warp-level-matrix-fragment-mma-1688):
// groupID = lane >> 2, threadID_in_group = lane % 4;
//   A (16 x 8, row):  a0 (g, t)  a1 (g + 8, t)  a2 (g, t + 4)  a3 (g + 8, t + 4)
//   B (8 x 8, col):   b0 (t, g)  b1 (t + 4, g)
//   C, D (16 x 8):    c0 (g, 2t)  c1 (g, 2t + 1)  c2 (g + 8, 2t)  c3 (g + 8, 2t + 1)
struct FragM16N8K8Tf32 {
    static const int M = 16, N = 8, K = 8, A_REGS = 4, B_REGS = 2, C_REGS = 4;
    __host__ __device__ static RowCol a(u32 lane, int i)
    {
        return RowCol{int(lane >> 2) + 8 * (i & 1), int(lane & 3) + 4 * (i >> 1)};
    }
    __host__ __device__ static RowCol b(u32 lane, int i) { return RowCol{int(lane & 3) + 4 * i, int(lane >> 2)}; }
    __host__ __device__ static RowCol c(u32 lane, int i)
    {
        return RowCol{int(lane >> 2) + 8 * (i >> 1), 2 * int(lane & 3) + (i & 1)};
    }
};

// PTX ISA, "Matrix Fragments for mma.m8n8k4 with .f64 floating point type"
// (https://docs.nvidia.com/cuda/parallel-thread-execution/#warp-level-matrix-fragment-mma-884-f64):
//   A (8 x 4, row):  a0 (lane >> 2, lane % 4)
//   B (4 x 8, col):  b0 (lane % 4, lane >> 2)
//   C, D (8 x 8):    c0 (g, 2t)  c1 (g, 2t + 1)
struct FragM8N8K4F64 {
    static const int M = 8, N = 8, K = 4, A_REGS = 1, B_REGS = 1, C_REGS = 2;
    __host__ __device__ static RowCol a(u32 lane, int) { return RowCol{int(lane >> 2), int(lane & 3)}; }
    __host__ __device__ static RowCol b(u32 lane, int) { return RowCol{int(lane & 3), int(lane >> 2)}; }
    __host__ __device__ static RowCol c(u32 lane, int i) { return RowCol{int(lane >> 2), 2 * int(lane & 3) + i}; }
};

// ---- cvt.rna.tf32.f32 ------------------------------------------------------------------------
// PTX ISA "cvt": x rounded to nearest, ties away from zero, to TF32's 10 explicit mantissa bits;
// the .b32 result has its 13 low bits zero. On the bits: (x + 0x1000) & ~0x1fff for finite x
// (a carry into the exponent is the right result, up to +-inf), inf unchanged, NaN a NaN.
__host__ __device__ inline u32 tf32_rna_model(u32 bits)
{
    if ((bits & 0x7f800000u) == 0x7f800000u) return (bits & 0x007fffffu) ? 0x7fffffffu : bits;
    return (bits + 0x1000u) & 0xffffe000u;
}

__device__ __forceinline__ u32 cvt_rna_tf32(float x)
{
#if defined(LORAKERN_HOST_EMULATION)
    return tf32_rna_model(__float_as_uint(x));
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    u32 r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return r;
#else
    __trap();
    return 0;
#endif
}

// ---- 3xTF32 ------------------------------------------------------------------------------
// x = big + small + e with big = tf32(x), small = tf32(x - big) (x - big is exact in fp32), and
// |e| <= 2^-22 |x|. A product x y is taken as big_x big_y + (big_x small_y + small_x big_y): three
// TF32 mma, the two small ones first (CUTLASS's "fast fp32", example 27); small_x small_y
// (<= 2^-22 |x y|) is dropped.
struct Tf32Split {
    u32 big, small;
};

__device__ __forceinline__ Tf32Split split_tf32(float x)
{
    const u32 big = cvt_rna_tf32(x);
    return Tf32Split{big, cvt_rna_tf32(__fsub_rn(x, __uint_as_float(big)))};
}

// ---- mma ------------------------------------------------------------------------------------
#if defined(LORAKERN_HOST_EMULATION)
// the emulation's models: gather the lanes' fragments through the coordinate function, check
// the operands, sum each output's exact products and round by lk_emu::mma_rounding()'s policy,
// scatter
struct MmaM16N8K8Tf32Regs {
    u32 a[4], b[2];
    float c[4];
};

inline const char* mma_m16n8k8_tf32_model(void* const* in, void* const* out, unsigned)
{
    typedef FragM16N8K8Tf32 F;
    static char message[256];
    float A[F::M][F::K], B[F::K][F::N], C[F::M][F::N];
    for (u32 lane = 0; lane < 32; ++lane) {
        const MmaM16N8K8Tf32Regs& r = *static_cast<const MmaM16N8K8Tf32Regs*>(in[lane]);
        for (int i = 0; i < F::A_REGS + F::B_REGS; ++i) {
            const u32 v = i < F::A_REGS ? r.a[i] : r.b[i - F::A_REGS];
            const bool nan = (v & 0x7f800000u) == 0x7f800000u && (v & 0x007fffffu);  // cvt's NaN: 0x7fffffff
            if ((v & 0x1fffu) && !nan) {
                std::snprintf(message, sizeof message,
                              "lane %u's %c%d = 0x%08x is not a .tf32 value (13 low bits not zero: no cvt.rna.tf32)",
                              lane, i < F::A_REGS ? 'a' : 'b', i < F::A_REGS ? i : i - F::A_REGS, v);
                return message;
            }
        }
        for (int i = 0; i < F::A_REGS; ++i) A[F::a(lane, i).row][F::a(lane, i).col] = __uint_as_float(r.a[i]);
        for (int i = 0; i < F::B_REGS; ++i) B[F::b(lane, i).row][F::b(lane, i).col] = __uint_as_float(r.b[i]);
        for (int i = 0; i < F::C_REGS; ++i) C[F::c(lane, i).row][F::c(lane, i).col] = r.c[i];
    }
    for (u32 lane = 0; lane < 32; ++lane)
        for (int i = 0; i < F::C_REGS; ++i) {
            const RowCol rc = F::c(lane, i);
            double terms[F::K + 1] = {C[rc.row][rc.col]};
            for (int k = 0; k < F::K; ++k)  // TF32 x TF32: 22 significant bits, exact in double
                terms[k + 1] = (double)A[rc.row][k] * (double)B[k][rc.col];
            static_cast<float*>(out[lane])[i] =
                (float)lk_emu::exact_sum(terms, F::K + 1, 24, lk_emu::mma_rounding());
        }
    return nullptr;
}

struct MmaM8N8K4F64Regs {
    double a, b, c[2];
};

inline const char* mma_m8n8k4_f64_model(void* const* in, void* const* out, unsigned)
{
    typedef FragM8N8K4F64 F;
    double A[F::M][F::K], B[F::K][F::N], C[F::M][F::N];
    for (u32 lane = 0; lane < 32; ++lane) {
        const MmaM8N8K4F64Regs& r = *static_cast<const MmaM8N8K4F64Regs*>(in[lane]);
        A[F::a(lane, 0).row][F::a(lane, 0).col] = r.a;
        B[F::b(lane, 0).row][F::b(lane, 0).col] = r.b;
        for (int i = 0; i < F::C_REGS; ++i) C[F::c(lane, i).row][F::c(lane, i).col] = r.c[i];
    }
    for (u32 lane = 0; lane < 32; ++lane)
        for (int i = 0; i < F::C_REGS; ++i) {
            const RowCol rc = F::c(lane, i);
            double terms[2 * F::K + 2] = {C[rc.row][rc.col], 0.0};  // pairs: c + 0, then p + e
            for (int k = 0; k < F::K; ++k) {  // each product exactly, as p + e (TwoProduct)
                const double p = A[rc.row][k] * B[k][rc.col];
                terms[2 * k + 2] = p;
                terms[2 * k + 3] = std::isfinite(p) ? std::fma(A[rc.row][k], B[k][rc.col], -p) : 0.0;
            }
            static_cast<double*>(out[lane])[i] =
                lk_emu::exact_sum(terms, 2 * F::K + 2, 53, lk_emu::mma_rounding(), 2);
        }
    return nullptr;
}
#endif

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32  d = a b + c (d may be c)
__device__ __forceinline__ void mma_m16n8k8_tf32(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2],
                                                 const float (&c)[4] LK_CALL_SITE)
{
#if defined(LORAKERN_HOST_EMULATION)
    MmaM16N8K8Tf32Regs in = {{a[0], a[1], a[2], a[3]}, {b[0], b[1]}, {c[0], c[1], c[2], c[3]}};
    lk_emu::warp_collective("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32", file_, line_, 0xffffffffu, true,
                            false, &in, d, &mma_m16n8k8_tf32_model);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %11, %12, %13};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
#else
    __trap();
#endif
}

// mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64  d = a b + c (d may be c)
__device__ __forceinline__ void mma_m8n8k4_f64(double (&d)[2], double a, double b, const double (&c)[2] LK_CALL_SITE)
{
#if defined(LORAKERN_HOST_EMULATION)
    MmaM8N8K4F64Regs in = {a, b, {c[0], c[1]}};
    lk_emu::warp_collective("mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64", file_, line_, 0xffffffffu, true, false,
                            &in, d, &mma_m8n8k4_f64_model);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64 {%0, %1}, {%2}, {%3}, {%4, %5};"
                 : "=d"(d[0]), "=d"(d[1])
                 : "d"(a), "d"(b), "d"(c[0]), "d"(c[1]));
#else
    __trap();
#endif
}

}  // namespace warp
}  // namespace lorakern

#endif  // LORAKERN_WARP_CUH
