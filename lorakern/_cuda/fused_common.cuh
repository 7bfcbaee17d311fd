// lorakern CUDA kernels: what both fused passes share (fused.cu's fused_pass, fused_mma.cu's
// fused_pass_mma): the small helpers, the copy wrappers, a block's super-tile and shared memory,
// and the partials they both write (layouts in fused.cu's opening comment), written once.
//
// The launcher (launch.py, module_source) puts this text before fused.cu, as plain text: no
// #include, so the module source NVRTC compiles (and its disk-cache digest) holds every byte.
// Every function is inlined into the kernels and computes what the lines it replaced did.

#ifndef LORAKERN_HOST_EMULATION
__device__ __forceinline__ unsigned char* lk_dynamic_smem()
{
    extern __shared__ __align__(128) unsigned char lk_smem[];
    return lk_smem;
}
__device__ __forceinline__ unsigned lk_dynamic_smem_size()
{
    unsigned bytes;
    asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(bytes));
    return bytes;
}
#endif

namespace lorakern {

constexpr int NT = 256;  // threads per block, every kernel

__host__ __device__ constexpr int cmin(int a, int b) { return a < b ? a : b; }
__host__ __device__ constexpr int cmax(int a, int b) { return a > b ? a : b; }
__host__ __device__ constexpr long long round128(long long bytes) { return (bytes + 127) / 128 * 128; }

template <typename T>
struct alignas(4 * sizeof(T)) Pack4 {
    T v[4];
};

template <typename T>
__device__ __forceinline__ Pack4<T> ld4(const T* p) { return *reinterpret_cast<const Pack4<T>*>(p); }
template <typename T>
__device__ __forceinline__ void st4(T* p, const Pack4<T>& x) { *reinterpret_cast<Pack4<T>*>(p) = x; }

__device__ __forceinline__ float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_rn(double a, double b, double c) { return __fma_rn(a, b, c); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }

__device__ __forceinline__ bool is_finite(double x) { return x - x == 0.0; }

__device__ __forceinline__ bool aligned(const void* p, unsigned long long bytes)
{
    return reinterpret_cast<unsigned long long>(p) % bytes == 0;
}

// ---- asynchronous global -> shared copies (cp.async on sm_80+; a plain copy elsewhere) -----
// src_bytes < BYTES zero-fills the rest; src_bytes == 0 reads nothing (src must still be valid).
// A copy is visible to its own thread after copy_async_wait_all, to the others after the
// __syncthreads that follows it. The host emulation (emulation.h) lands each copy only at that
// wait and fills its destination with NaN until then, so a missing wait shows in the results.
template <int BYTES>
__device__ __forceinline__ void copy_async(void* dst, const void* src, int src_bytes)
{
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
    unsigned s;
    asm volatile("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(s) : "l"(dst));
    if (BYTES == 16)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(s), "l"(src), "r"(src_bytes) : "memory");
    else
        asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;" ::"r"(s), "l"(src), "n"(BYTES), "r"(src_bytes)
                     : "memory");
#elif defined(LORAKERN_HOST_EMULATION)
    lk_emu::copy_async(dst, src, BYTES, src_bytes);  // lands at the wait (emulation.h)
#else
    unsigned char* d = static_cast<unsigned char*>(dst);
    const unsigned char* g = static_cast<const unsigned char*>(src);
    for (int i = 0; i < BYTES; ++i) d[i] = i < src_bytes ? g[i] : 0;
#endif
}

__device__ __forceinline__ void copy_async_commit()
{
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
    asm volatile("cp.async.commit_group;" ::: "memory");
#elif defined(LORAKERN_HOST_EMULATION)
    lk_emu::copy_async_commit();
#endif
}

__device__ __forceinline__ void copy_async_wait_all()
{
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
    asm volatile("cp.async.wait_all;" ::: "memory");
#elif defined(LORAKERN_HOST_EMULATION)
    lk_emu::copy_async_wait_all();
#endif
}

// cp.async.wait_group N: every committed copy group but the newest N has landed (for this thread)
template <int N>
__device__ __forceinline__ void copy_async_wait_group()
{
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#elif defined(LORAKERN_HOST_EMULATION)
    lk_emu::copy_async_wait_group(N);
#endif
}

// rows [row0, row0 + ROWS) x columns [col0, col0 + COLS) of a row-major nrows x ncols matrix
// g (leading dimension ld) -> s (leading dimension lds), zeros outside the matrix.
// vec: 16-byte chunks (ld and g 16-byte aligned; col0 a multiple of the chunk).
template <typename T, int ROWS, int COLS>
__device__ __forceinline__ void tile_async(T* s, int lds, const T* g, long long ld, int row0, int col0,
                                           int nrows, int ncols, bool vec)
{
    if (vec) {
        constexpr int V = 16 / sizeof(T);
        constexpr int CH = COLS / V;
        static_assert(COLS % V == 0, "tile width must be a multiple of a 16-byte chunk");
#pragma unroll 2
        for (int e = threadIdx.x; e < ROWS * CH; e += NT) {
            const int rr = e / CH, cc = (e % CH) * V;
            const int row = row0 + rr, col = col0 + cc;
            const int valid = row < nrows ? cmax(0, cmin(V, ncols - col)) : 0;
            const T* src = valid > 0 ? g + row * ld + col : g;
            copy_async<16>(s + rr * lds + cc, src, valid * (int)sizeof(T));
        }
    } else {
#pragma unroll 4
        for (int e = threadIdx.x; e < ROWS * COLS; e += NT) {
            const int rr = e / COLS, cc = e % COLS;
            const int row = row0 + rr, col = col0 + cc;
            const bool valid = row < nrows && col < ncols;
            copy_async<(int)sizeof(T)>(s + rr * lds + cc, valid ? g + row * ld + col : g,
                                       valid ? (int)sizeof(T) : 0);
        }
    }
}

// 4 consecutive entries p[0..3], of which the first `valid` exist (zeros for the rest)
template <typename T>
__device__ __forceinline__ void load_row4(T out[4], const T* p, int valid, bool vec)
{
    if (vec && valid == 4) {
        const Pack4<T> x = ld4(p);
#pragma unroll
        for (int j = 0; j < 4; ++j) out[j] = x.v[j];
    } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) out[j] = j < valid ? p[j] : T(0);
    }
}

__device__ __forceinline__ unsigned load_mask4(const unsigned char* p, int valid, bool vec)
{
    if (vec && valid == 4) return *reinterpret_cast<const unsigned*>(p);
    unsigned bits = 0;
    for (int j = 0; j < 4; ++j)
        if (j < valid) bits |= (unsigned)p[j] << (8 * j);
    return bits;
}

// sum of a[t] and b[t] over the block's threads, fixed tree order; red holds 2 * NT doubles.
// Every thread must call it; thread 0 gets the sums.
__device__ __forceinline__ void block_sum2(double* red, double& a, double& b)
{
    const int tid = threadIdx.x;
    red[tid] = a;
    red[NT + tid] = b;
    __syncthreads();
#pragma unroll
    for (int s = NT / 2; s > 0; s >>= 1) {
        if (tid < s) {
            red[tid] += red[tid + s];
            red[NT + tid] += red[NT + tid + s];
        }
        __syncthreads();
    }
    a = red[0];
    b = red[NT];
}

// ---- a block's super-tile --------------------------------------------------------------------
// A grid of nrs x nsc blocks over the ntr x ntc tiles of BM x BN, row super-tiles outer: block
// (rs, cs) owns row tiles rt0 .. and column tiles ct0 .. ct0 + nct - 1 (fewer at the matrix's
// edges) and walks them row tile by row tile, column tiles inner: ntiles tiles in all.
struct SuperTile {
    int rs, cs, rt0, ct0, nct, ntiles;
};

template <int BM, int BN>
__device__ __forceinline__ SuperTile super_tile(int m, int n, int rpb, int cpb)
{
    const int ntr = (m + BM - 1) / BM, ntc = (n + BN - 1) / BN;
    const int nsc = (ntc + cpb - 1) / cpb;
    SuperTile s;
    s.rs = blockIdx.x / nsc;
    s.cs = blockIdx.x % nsc;
    s.rt0 = s.rs * rpb;
    s.ct0 = s.cs * cpb;
    s.nct = cmin(cpb, ntc - s.ct0);
    s.ntiles = cmin(rpb, ntr - s.rt0) * s.nct;
    return s;
}

// ---- a fused pass's shared memory --------------------------------------------------------------
// C (Fused or FusedMma) lays it out: A tiles, B tiles, data tiles X and (labels) Y, then the work
// area W, each C::*_BYTES long. Traps when the launcher gave less than C::SMEM_BYTES.
template <typename T>
struct PassSmem {
    T *A, *B, *X, *Y;
    unsigned char* W;
};

template <typename C, typename T>
__device__ __forceinline__ PassSmem<T> pass_smem()
{
    unsigned char* smem = lk_dynamic_smem();
    if (lk_dynamic_smem_size() < (unsigned)C::SMEM_BYTES) __trap();  // launcher and kernel disagree
    PassSmem<T> s;
    s.A = reinterpret_cast<T*>(smem);
    s.B = reinterpret_cast<T*>(smem + C::A_BYTES);
    s.X = reinterpret_cast<T*>(smem + C::A_BYTES + C::B_BYTES);
    s.Y = reinterpret_cast<T*>(smem + C::A_BYTES + C::B_BYTES + C::X_BYTES);
    s.W = smem + C::A_BYTES + C::B_BYTES + C::X_BYTES + C::Y_BYTES;
    return s;
}

// ---- the partials both passes write ------------------------------------------------------------
// gA_part[rs][RK][n_ld]: the block's own slice of grad_A, one per row super-tile rs. The grad_A
// tile (RK x BN at column col0) comes as S3 split sums sums[s][k][c] in shared memory; they are
// summed in split order and written at the super-tile's first row tile, added to what the slice
// holds (prev + sum) at the later ones. C (Fused or FusedMma) gives S3, OP3 (packs of 4 per
// thread) and PREFETCH_GA: prev fetched at the start of the tile (prefetch_gA) into a register
// array of PREFETCH_GA ? OP3 : 1 packs, else read here.
template <typename C, int RK, int BN, typename T, int N>
__device__ __forceinline__ void prefetch_gA(Pack4<T> (&prev)[N], const T* gA_part, int rs, long long n_ld, int col0)
{
    const int tid = threadIdx.x;
#pragma unroll
    for (int p = 0; p < C::OP3; ++p) {
        const int e = tid + p * NT;
        if (e < RK * BN / 4)
            prev[p] = ld4(gA_part + ((long long)rs * RK + e / (BN / 4)) * n_ld + col0 + (e % (BN / 4)) * 4);
    }
}

template <typename C, int RK, int BN, typename T, int N>
__device__ __forceinline__ void flush_gA(const T* sums, T* gA_part, int rs, long long n_ld, int col0, bool add,
                                         const Pack4<T> (&prev)[N])
{
    const int tid = threadIdx.x;
#pragma unroll
    for (int p = 0; p < C::OP3; ++p) {
        const int e = tid + p * NT;
        if (C::OP3 * NT > RK * BN / 4 && e >= RK * BN / 4) break;
        const int k = e / (BN / 4), c = (e % (BN / 4)) * 4;
        Pack4<T> sum = ld4(sums + k * BN + c);
        for (int s = 1; s < C::S3; ++s) {
            const Pack4<T> v = ld4(sums + ((long long)s * RK + k) * BN + c);
#pragma unroll
            for (int j = 0; j < 4; ++j) sum.v[j] += v.v[j];
        }
        T* dst = gA_part + ((long long)rs * RK + k) * n_ld + col0 + c;
        if (add) {  // earlier row tiles of this super-tile
            const Pack4<T> old = C::PREFETCH_GA ? prev[C::PREFETCH_GA ? p : 0] : ld4(dst);
#pragma unroll
            for (int j = 0; j < 4; ++j) sum.v[j] = old.v[j] + sum.v[j];
        }
        st4(dst, sum);
    }
}

// ---- the pointwise (eq. 7) ---------------------------------------------------------------------
// One entry at t (y: the label, or t itself for residual losses): the loss's value and
// G = dL/dt (loss_pointwise, the prelude's device function) where keep (inside m x n and on the
// mask: keep(), asked after the loss as the kernels always did, which ptxas's register counts
// see), G = 0 elsewhere; the value and G^2 added to the thread's float64 sums. Returns G.
template <typename T, typename Keep>
__device__ __forceinline__ T pointwise(T t, T y, double delta, Keep keep_of, double& loss_acc, double& gsq_acc)
{
    double value, grad;
    loss_pointwise<T>(t, y, delta, &value, &grad);
    const bool keep = keep_of();
    const T g = keep ? (T)grad : T(0);
    loss_acc += keep ? value : 0.0;
    gsq_acc += (double)g * (double)g;
    return g;
}

// scal_part[block] = (loss, ||G||^2, ||V||^2 share): the threads' float64 sums of the pass
// (eq. 7), and this block's share of ||B||_F^2 + ||A||_F^2 (a grid-stride walk over B's m r
// entries, then A's r n, the same walk in every pass of a plan), each in block_sum2's order.
// ||V_t||^2 is summed here, in the pass, so that the tail (fused.cu) has all three of eta_t's
// sums from one array and needs no second kernel. Every thread must call it; red is free
// shared memory of 2 * NT doubles.
template <typename T>
__device__ __forceinline__ void store_scal_part(double* red, double loss, double gsq, const T* __restrict__ B,
                                                const T* __restrict__ A, long long mr, long long rn,
                                                double* scal_part)
{
    double vsq = 0.0, unused = 0.0;
    for (long long e = (long long)blockIdx.x * NT + threadIdx.x; e < mr + rn; e += (long long)gridDim.x * NT) {
        const double v = (double)(e < mr ? B[e] : A[e - mr]);
        vsq += v * v;
    }
    block_sum2(red, loss, gsq);
    __syncthreads();  // red is read by every thread above before it is written again
    block_sum2(red, vsq, unused);
    if (threadIdx.x == 0) {
        scal_part[3 * blockIdx.x] = loss;
        scal_part[3 * blockIdx.x + 1] = gsq;
        scal_part[3 * blockIdx.x + 2] = vsq;
    }
}

}  // namespace lorakern
