// Host emulation of the CUDA kernels in fused.cu (and of small test kernels): compiled by g++,
// each CUDA thread a fiber with its own stack, a block's 256 fibers switched at __syncthreads
// on one OS thread, the blocks of a grid one after another. emulation.py puts this header in
// front of a module's source (loss prelude + fused.cu) and adds a wrapper per kernel; the
// launcher and the kernels' index arithmetic, tails and reductions then run without a GPU.
// The emulation is stricter than a GPU on purpose, so that a bug the hardware happens to hide
// shows up in the results or as an error:
//
//   shared memory   filled with 0xff bytes (NaN) before every block: reading what no thread
//                   of this block wrote gives NaN.
//   cp.async        deferred: a copy poisons its destination (0xff) when issued and lands only
//                   at the issuing thread's cp.async.wait_group / wait_all that covers its
//                   commit group, so a missing wait, or a read before it, reads NaN. The
//                   addresses are checked (alignment, inside the block's shared memory), and a
//                   thread may not leave a block with copies it never waited for.
//   __syncthreads   every thread of the block must reach the same barrier (the same line of
//                   source); threads at different barriers, or some at a barrier and some at
//                   the end of the kernel, fail at once naming who is where. A thread that runs
//                   for `timeout` seconds without reaching a barrier fails the launch too (a
//                   deadlock: it waits for something that never comes). A failure ends the
//                   launch with an error message (HostRuntime raises EmulationError), not a hang.
//   order           the threads of a phase run one after another, in ascending thread order in
//                   one phase and descending in the next, so a read of what another thread
//                   writes in the same phase (a missing barrier) depends on who runs first.
//   blocks          run one after another, in ascending or descending block order
//                   (HostRuntime(block_order=...)): a kernel whose results depend on that order
//                   reads what another block of the same launch writes (a cross-block race,
//                   which a GPU would show only now and then); tests run both orders and require
//                   the same bits.
//   races           under ThreadSanitizer (modules built with -fsanitize=thread, libtsan
//                   loaded) each thread is a TSan fiber and each barrier orders exactly what a
//                   __syncthreads orders: two threads touching the same memory between two
//                   barriers, one of them writing, fail (ci/emulation_tsan.py).
//
//   warps         a warp collective (__shfl*_sync, __syncwarp, the mma wrappers of warp.cuh) is a
//                   rendezvous of the lanes its mask names: each lane deposits its registers and
//                   yields; when every lane of the mask waits at the same call site with the same
//                   mask the runtime executes the instruction. A calling lane left out of its own
//                   mask, a lane of the mask that waits elsewhere (another collective, a
//                   __syncthreads) or has ended (a divergent warp), and an .aligned instruction
//                   (mma) called by less than the whole warp fail the launch at once.
//   mma           warp.cuh's models gather the 32 lanes' fragments through the PTX ISA's
//                   coordinate functions, reject .tf32 operands whose 13 low bits are not zero
//                   (a missing cvt.rna.tf32), form every product exactly and round the sum once,
//                   by the policy HostRuntime(mma_rounding="rn" | "rz" | "aligned") sets: the
//                   PTX ISA does not specify the accumulation's rounding, so tests run under
//                   all three ("aligned": the terms aligned to the largest one's exponent and
//                   truncated there before the sum, as tensor cores are reported to add).
//
// What it cannot check: timing, memory order between blocks (they run one after another; the
// block order above catches what depends on which runs first),
// the PTX paths (the asm is not compiled), lanes of a warp running in lockstep (they run one
// after another, and meet only at the collectives).
//
// Two parts. The declarations below are all a module sees: they parse fast, so that each of
// the many template instances the tests ask for compiles in a second or so. The runtime
// (fibers, barriers, copies, the launcher) is the part under LORAKERN_EMULATION_RUNTIME,
// compiled once into a library every module links against.
#ifndef LORAKERN_EMULATION_H
#define LORAKERN_EMULATION_H

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <type_traits>
#include <utility>

#define LORAKERN_HOST_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static
#define __align__(n) alignas(n)
using std::exp;
using std::fabs;
using std::fmax;
using std::fmin;
using std::log1p;
using std::sqrt;

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
extern thread_local dim3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;

namespace lk_emu {

void barrier_at(const char* file, int line);
[[noreturn]] void trap();
unsigned char* dynamic_smem();
unsigned dynamic_smem_size();
void copy_async(void* dst, const void* src, int bytes, int src_bytes);
void copy_async_commit();
void copy_async_wait_group(int n);
void copy_async_wait_all();

// ---- warp collectives: the lanes of `mask` meet at one call site; `combine` (null: none) then
// reads every lane's `in` and writes every lane's `out` (the arrays are indexed by lane, null
// for lanes outside the mask) and returns null, or a message that fails the launch.
using Combine = const char* (*)(void* const* in, void* const* out, unsigned mask);
void warp_collective(const char* what, const char* file, int line, unsigned mask, bool aligned, bool orders_memory,
                     void* in, void* out, Combine combine);
// the rounding of an mma's sum (HostRuntime(mma_rounding=...)): 0 to nearest even, 1 toward zero,
// 2 aligned and truncated (each term first truncated to the `precision` bits below the largest
// term's leading bit, then the exact sum of those toward zero)
int mma_rounding();
// terms[0] + ... + terms[n-1] rounded once to a binary floating-point number of `precision` bits
// (24: float, 53: double) by `mode` (mma_rounding()'s): 0 the exact sum to nearest even, 1 the
// exact sum toward zero, 2 the terms aligned to the largest one's exponent and truncated there,
// then summed exactly and truncated; every term finite (else the plain double sum: NaN and inf
// propagate)
// (`group`: consecutive doubles that make one term, e.g. an exact product as p + e)
double exact_sum(const double* terms, int n, int precision, int mode, int group = 1);

using Thunk = void (*)(void* kernel, void** args);
int launch(Thunk thunk, void* kernel, unsigned grid, unsigned block, unsigned smem, void** args, double timeout);
const char* last_error();

template <typename... Args, std::size_t... I>
void call(void (*k)(Args...), void** args, std::index_sequence<I...>)
{
    k(*reinterpret_cast<std::remove_cv_t<Args>*>(args[I])...);
}

template <typename... Args>
void thunk(void* k, void** args)
{
    call(reinterpret_cast<void (*)(Args...)>(k), args, std::index_sequence_for<Args...>{});
}

// runs kernel k on grid x block threads; 0, or 1 with the reason in last_error()
template <typename... Args>
int launch_kernel(void (*k)(Args...), unsigned grid, unsigned block, unsigned smem, void** args, double timeout)
{
    return launch(&thunk<Args...>, reinterpret_cast<void*>(k), grid, block, smem, args, timeout);
}

// each parameter as (kind, size): kind 'p' pointer, 'f' floating point, 'i' integer
template <typename... Args>
int signature(void (*)(Args...), char* kinds, int* sizes)
{
    int i = 0;
    ((kinds[i] = std::is_pointer_v<Args> ? 'p' : std::is_floating_point_v<Args> ? 'f' : 'i',
      sizes[i++] = (int)sizeof(Args)),
     ...);
    return i;
}

}  // namespace lk_emu

inline unsigned char* lk_dynamic_smem() { return lk_emu::dynamic_smem(); }
inline unsigned lk_dynamic_smem_size() { return lk_emu::dynamic_smem_size(); }
inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE())
{
    lk_emu::barrier_at(file, line);
}
[[noreturn]] inline void __trap() { lk_emu::trap(); }
// warp collectives on the lanes of `mask` (CUDA's semantics; see lk_emu::warp_collective)
namespace lk_emu {
struct Shfl {
    unsigned long long value;
    int lane;   // the source lane, the xor mask or the delta
    int width;
    int kind;   // 0 idx, 1 xor, 2 down, 3 up
};
const char* shfl_combine(void* const* in, void* const* out, unsigned mask);
template <typename T>
T shfl(const char* what, unsigned mask, T var, int lane, int width, int kind, const char* file, int line)
{
    static_assert(sizeof(T) <= 8, "a shuffle moves at most 8 bytes");
    Shfl in{0, lane, width, kind};
    std::memcpy(&in.value, &var, sizeof(T));
    unsigned long long out = 0;
    warp_collective(what, file, line, mask, false, false, &in, &out, &shfl_combine);
    T result;
    std::memcpy(&result, &out, sizeof(T));
    return result;
}
}  // namespace lk_emu
template <typename T>
T __shfl_sync(unsigned mask, T var, int src, int width = 32, const char* file = __builtin_FILE(),
              int line = __builtin_LINE())
{
    return lk_emu::shfl("__shfl_sync", mask, var, src, width, 0, file, line);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32, const char* file = __builtin_FILE(),
                  int line = __builtin_LINE())
{
    return lk_emu::shfl("__shfl_xor_sync", mask, var, lane_mask, width, 1, file, line);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32, const char* file = __builtin_FILE(),
                   int line = __builtin_LINE())
{
    return lk_emu::shfl("__shfl_down_sync", mask, var, (int)delta, width, 2, file, line);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32, const char* file = __builtin_FILE(),
                 int line = __builtin_LINE())
{
    return lk_emu::shfl("__shfl_up_sync", mask, var, (int)delta, width, 3, file, line);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(), int line = __builtin_LINE())
{
    lk_emu::warp_collective("__syncwarp()", file, line, mask, false, true, nullptr, nullptr, nullptr);
}

inline unsigned __float_as_uint(float x)
{
    unsigned u;
    std::memcpy(&u, &x, 4);
    return u;
}
inline float __uint_as_float(unsigned u)
{
    float x;
    std::memcpy(&x, &u, 4);
    return x;
}
inline float __fadd_rn(float a, float b) { return a + b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline double __dsub_rn(double a, double b) { return a - b; }

#endif  // LORAKERN_EMULATION_H

// ==== the runtime =============================================================================
// A block's CUDA threads are fibers (ucontext) on one OS thread, switched at __syncthreads:
// each runs until it reaches a barrier or the end of the kernel, and when every thread of the
// block waits at the same barrier, all of them go on. Rounds alternate between ascending and
// descending thread order, so that a thread reading what another writes in the same phase
// (a missing barrier) sees a different value depending on its number. A barrier costs about
// 0.3 ms (two context switches per thread); with an OS thread per CUDA thread it cost 1-2 ms
// on 2 cores (every barrier woke 256 threads), and each launch started and joined them.
//
// Under ThreadSanitizer (a process with libtsan loaded, modules built with -fsanitize=thread)
// every fiber is a TSan fiber: the switches imply no ordering, and each barrier releases and
// acquires a synchronisation object of its own phase, so TSan orders exactly what a barrier
// orders. This runtime itself is built without instrumentation; its copies (memcpy, memset)
// are checked through TSan's interceptors, as the fiber that issues them.
#if defined(LORAKERN_EMULATION_RUNTIME) && !defined(LORAKERN_EMULATION_RUNTIME_DONE)
#define LORAKERN_EMULATION_RUNTIME_DONE

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

// ThreadSanitizer's fiber interface, where a TSan runtime is loaded (null otherwise)
extern "C" {
void* __tsan_get_current_fiber() __attribute__((weak));
void* __tsan_create_fiber(unsigned flags) __attribute__((weak));
void __tsan_switch_to_fiber(void* fiber, unsigned flags) __attribute__((weak));
void __tsan_set_fiber_name(void* fiber, const char* name) __attribute__((weak));
void __tsan_acquire(void* addr) __attribute__((weak));
void __tsan_release(void* addr) __attribute__((weak));
void __tsan_ignore_thread_begin() __attribute__((weak));
void __tsan_ignore_thread_end() __attribute__((weak));
}

thread_local dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

namespace lk_emu {

// A place in the source where threads meet: a __syncthreads() call site, or the end of the kernel.
struct Site {
    const char* file = nullptr;
    int line = 0;
    const char* what = "";
    bool operator==(const Site& o) const
    {
        if (line != o.line || std::strcmp(what, o.what) != 0) return false;
        return file == o.file || (file != nullptr && o.file != nullptr && std::strcmp(file, o.file) == 0);
    }
    std::string str() const
    {
        if (file == nullptr) return what;
        return std::string(what) + " at " + file + ":" + std::to_string(line);
    }
};

struct Failure {};  // unwinds a fiber once its launch has failed

struct Copy {  // one cp.async: `bytes` to dst, the first `src_bytes` of them from src
    unsigned char* dst;
    const unsigned char* src;
    int bytes, src_bytes;
};

constexpr std::size_t STACK_BYTES = 512 * 1024;  // per CUDA thread (TSan frames are large)
constexpr unsigned TSAN_NO_SYNC = 1;              // __tsan_switch_to_fiber_no_sync

enum class State { ready, waiting, collective, done };

struct Fiber {
    ucontext_t ctx;
    unsigned char* stack = nullptr;  // STACK_BYTES above a guard page
    void* tsan = nullptr;
    unsigned tid = 0;
    State state = State::done;
    Site site;                        // where it waits
    unsigned phase = 0;               // barriers passed in this block
    std::vector<Copy> pending;        // issued cp.async copies that have not landed
    std::vector<std::size_t> groups;  // pending.size() at each commit, oldest first
    // the warp collective it waits at (State::collective; site above)
    unsigned mask = 0;
    bool aligned = false, orders_memory = false;
    void* in = nullptr;
    void* out = nullptr;
    Combine combine = nullptr;
    unsigned warp_phase = 0;          // __syncwarp()s passed (TSan)
};

struct Launch {
    Thunk thunk = nullptr;
    void* kernel = nullptr;
    void** args = nullptr;
    unsigned nthreads = 0, grid = 0;
    double timeout = 5.0;  // seconds one thread may run without reaching a barrier
    unsigned char* smem = nullptr;
    unsigned smem_bytes = 0;
    std::atomic<bool> failed{false};
    char sync[2];          // TSan synchronisation objects of even and odd barrier phases
    char warp_sync[32][2]; // the same for each warp's __syncwarp()

    // shared with the launcher's watchdog: counters it reads, the rest under mu
    std::atomic<unsigned long long> switches{0};  // fiber switches so far
    std::atomic<unsigned> running{0}, block{0};   // the thread that runs, its block
    std::mutex mu;
    std::condition_variable done_cv;
    bool done = false;
    std::string message;           // the first failure
    unsigned waiting = 0;          // threads waiting at a barrier in this round
    Site waiting_at;               // the first one's barrier
};

static Launch* current = nullptr;
static Fiber* running = nullptr;  // the fiber executing, nullptr in the scheduler
static ucontext_t scheduler;
static void* scheduler_tsan = nullptr;
static std::vector<std::unique_ptr<Fiber>> fibers;
static std::string error_text;     // of the last failed launch

static bool tsan() { return __tsan_switch_to_fiber != nullptr; }

static std::string ranges(const std::vector<unsigned>& ids)
{
    std::string out;
    int pieces = 0;
    for (std::size_t i = 0; i < ids.size();) {
        std::size_t j = i;
        while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
        if (++pieces > 6) {
            out += ", ... (" + std::to_string(ids.size()) + " threads)";
            break;
        }
        if (!out.empty()) out += ", ";
        out += std::to_string(ids[i]);
        if (j > i) out += "-" + std::to_string(ids[j]);
        i = j + 1;
    }
    return out;
}

static std::string where_am_i()
{
    return "thread " + std::to_string(threadIdx.x) + " of block " + std::to_string(blockIdx.x);
}

static void record_failure(Launch& L, const std::string& what)
{
    std::lock_guard<std::mutex> lock(L.mu);
    if (!L.failed.load()) {
        L.message = what;
        L.failed.store(true);
    }
}

[[noreturn]] static void fail(const std::string& what)
{
    record_failure(*current, what);
    throw Failure{};
}

// ---- fibers ---------------------------------------------------------------------------------
static void to_scheduler()  // from the running fiber
{
    Fiber& f = *running;
    if (tsan()) __tsan_switch_to_fiber(scheduler_tsan, TSAN_NO_SYNC);
    swapcontext(&f.ctx, &scheduler);
}

static void resume(Launch& L, Fiber& f)  // from the scheduler
{
    L.switches.fetch_add(1, std::memory_order_relaxed);
    L.running.store(f.tid, std::memory_order_relaxed);
    running = &f;
    threadIdx = dim3{f.tid, 1, 1};
    if (tsan()) __tsan_switch_to_fiber(f.tsan, TSAN_NO_SYNC);
    swapcontext(&scheduler, &f.ctx);
    running = nullptr;
}

static void entry()
{
    Fiber& f = *running;
    Launch& L = *current;
    if (tsan()) __tsan_acquire(&L.sync[0]);  // the block's start: shared memory poisoned, arguments
    try {
        L.thunk(L.kernel, L.args);
        if (!f.pending.empty())
            fail(std::to_string(f.pending.size()) + " cp.async copies issued by " + where_am_i() +
                 " were never waited for");
    } catch (const Failure&) {
    } catch (const std::exception& e) {
        record_failure(L, std::string("exception in ") + where_am_i() + ": " + e.what());
    }
    if (tsan()) __tsan_release(&L.sync[(f.phase + 1) % 2]);
    f.state = State::done;
    to_scheduler();  // never resumed: the next block makes the context anew
}

static void start(Fiber& f)
{
    if (f.stack == nullptr) {
        const long page = 4096;
        void* p = mmap(nullptr, STACK_BYTES + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) {
            std::fprintf(stderr, "lorakern CUDA emulation: no memory for a thread's stack\n");
            std::abort();
        }
        mprotect(p, page, PROT_NONE);  // an overflow faults instead of writing over a neighbour
        f.stack = static_cast<unsigned char*>(p) + page;
        if (tsan()) {
            f.tsan = __tsan_create_fiber(0);
            if (__tsan_set_fiber_name)
                __tsan_set_fiber_name(f.tsan, ("CUDA thread " + std::to_string(f.tid)).c_str());
        }
    }
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = STACK_BYTES;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, entry, 0);
    f.state = State::ready;
    f.phase = 0;
    f.pending.clear();
    f.groups.clear();
}

// every thread of the block arrives here from the same site, or the launch fails
static void barrier(const Site& site)
{
    Fiber& f = *running;
    Launch& L = *current;
    if (L.failed.load()) throw Failure{};
    f.state = State::waiting;
    f.site = site;
    {
        std::lock_guard<std::mutex> lock(L.mu);
        if (L.waiting++ == 0) L.waiting_at = site;
    }
    ++f.phase;
    if (tsan()) __tsan_release(&L.sync[f.phase % 2]);
    to_scheduler();
    if (tsan()) __tsan_acquire(&L.sync[f.phase % 2]);
    if (L.failed.load()) throw Failure{};
}

void barrier_at(const char* file, int line) { barrier(Site{file, line, "__syncthreads()"}); }

// ---- warp collectives -----------------------------------------------------------------------
void warp_collective(const char* what, const char* file, int line, unsigned mask, bool aligned, bool orders_memory,
                     void* in, void* out, Combine combine)
{
    Fiber& f = *running;
    Launch& L = *current;
    if (L.failed.load()) throw Failure{};
    f.state = State::collective;
    f.site = Site{file, line, what};
    f.mask = mask;
    f.aligned = aligned;
    f.orders_memory = orders_memory;
    f.in = in;
    f.out = out;
    f.combine = combine;
    char* sync = L.warp_sync[(f.tid / 32) % 32];
    if (orders_memory) {
        ++f.warp_phase;
        if (tsan()) __tsan_release(&sync[f.warp_phase % 2]);
    }
    to_scheduler();
    if (orders_memory && tsan()) __tsan_acquire(&sync[f.warp_phase % 2]);
    if (L.failed.load()) throw Failure{};
}

static int rounding_policy = 0;
int mma_rounding() { return rounding_policy; }

static int block_order = 0;  // 0: blocks 0, 1, ..., grid - 1; 1: the reverse

static std::string hex(unsigned x)
{
    char text[16];
    std::snprintf(text, sizeof text, "0x%08x", x);
    return text;
}

// where a lane is, for a message
static std::string whereabouts(const Fiber& f)
{
    if (f.state == State::done) return "has reached the end of the kernel";
    if (f.state == State::collective) return "waits at " + f.site.str() + " with mask " + hex(f.mask);
    return "waits at " + f.site.str();
}

// After a round: the warps' collectives whose lanes have all come run, and those lanes go on
// (`ran`: whether any did). False, the launch failed, for a collective that cannot complete:
// a calling lane outside its mask, a lane of the mask elsewhere or ended, an .aligned
// instruction without the whole warp, or an error of the instruction's model.
static bool run_collectives(Launch& L, unsigned block, bool& ran)
{
    ran = false;
    for (unsigned first = 0; first < L.nthreads; first += 32) {
        const unsigned count = std::min(32u, L.nthreads - first);
        const unsigned present = count == 32 ? 0xffffffffu : (1u << count) - 1;
        unsigned pending = 0;
        for (unsigned l = 0; l < count; ++l)
            if (fibers[first + l]->state == State::collective) pending |= 1u << l;
        while (pending) {
            const unsigned l0 = (unsigned)__builtin_ctz(pending);
            const Fiber& lead = *fibers[first + l0];
            const unsigned mask = lead.mask;
            const std::string who = "lane " + std::to_string(l0) + " (thread " + std::to_string(first + l0) +
                                    ") of block " + std::to_string(block) + " at " + lead.site.str();
            std::string problem;
            if (!(mask >> l0 & 1u))
                problem = who + " calls it with mask " + hex(mask) + ", which leaves out the calling lane";
            else if (mask & ~present)
                problem = who + ": mask " + hex(mask) + " names lanes the block does not have";
            else if (lead.aligned && mask != 0xffffffffu)
                problem = who + ": an .aligned instruction needs the whole warp (mask " + hex(mask) + ")";
            else
                for (unsigned k = 0; k < 32 && problem.empty(); ++k) {
                    if (!(mask >> k & 1u)) continue;
                    const Fiber& o = *fibers[first + k];
                    if (o.state != State::collective || !(o.site == lead.site) || o.mask != mask)
                        problem = "divergent warp: " + who + " with mask " + hex(mask) + " waits for lane " +
                                  std::to_string(k) + ", which " + whereabouts(o);
                }
            if (problem.empty() && lead.combine != nullptr) {
                void* in[32] = {};
                void* out[32] = {};
                for (unsigned k = 0; k < 32; ++k)
                    if (mask >> k & 1u) {
                        in[k] = fibers[first + k]->in;
                        out[k] = fibers[first + k]->out;
                    }
                // the lanes' deposited registers (their own stacks) are read and written here by
                // the scheduler: private copies, no memory the kernel shares. TSan is told to
                // look away rather than to order the lanes (which would hide races between them:
                // an mma orders no memory)
                if (tsan() && __tsan_ignore_thread_begin) __tsan_ignore_thread_begin();
                const char* error = lead.combine(in, out, mask);
                if (tsan() && __tsan_ignore_thread_end) __tsan_ignore_thread_end();
                if (error)
                    problem = lead.site.str() + " in warp " + std::to_string(first / 32) + " of block " +
                              std::to_string(block) + ": " + error;
            }
            if (!problem.empty()) {
                record_failure(L, problem);
                return false;
            }
            for (unsigned k = 0; k < 32; ++k)
                if (mask >> k & 1u) fibers[first + k]->state = State::ready;
            pending &= ~mask;
            ran = true;
        }
    }
    return true;
}

// CUDA's shuffles: a source lane outside the mask gives an undefined value (here all 0xff bytes:
// NaN); a source outside the lane's segment of `width` lanes, the lane's own value (down, up, xor)
const char* shfl_combine(void* const* in, void* const* out, unsigned mask)
{
    for (unsigned lane = 0; lane < 32; ++lane) {
        if (!(mask >> lane & 1u)) continue;
        const Shfl& s = *static_cast<const Shfl*>(in[lane]);
        const int width = s.width;
        if (width < 1 || width > 32 || (width & (width - 1)) != 0) return "width must be a power of 2 in [1, 32]";
        const int start = (int)lane / width * width;
        int src = (int)lane;
        if (s.kind == 0) src = start + (s.lane & (width - 1));
        else if (s.kind == 1) src = (int)lane ^ s.lane;
        else if (s.kind == 2) src = (int)lane + s.lane;
        else src = (int)lane - s.lane;
        if (s.kind != 0 && (src < start || src >= start + width)) src = (int)lane;
        unsigned long long& result = *static_cast<unsigned long long*>(out[lane]);
        result = (mask >> src & 1u) ? static_cast<const Shfl*>(in[src])->value : ~0ull;
    }
    return nullptr;
}

// ---- an exact sum, rounded once ----------------------------------------------------------------
// A fixed-point accumulator wide enough for every double: bit p has weight 2^(p - 1074), in
// 32-bit limbs (held in 64-bit integers, so that a few terms add without carrying).
struct ExactSum {
    static constexpr int LIMBS = 70;  // 2240 bits > 1074 + 1024 + carries
    std::int64_t limb[LIMBS] = {};

    void add(double x)
    {
        if (x == 0) return;
        int e;
        const double m = std::frexp(std::fabs(x), &e);  // |x| = m 2^e, 0.5 <= m < 1
        auto mag = (std::uint64_t)std::ldexp(m, 53);     // |x| = mag 2^(e - 53)
        int pos = e - 53 + 1074;
        if (pos < 0) {  // a subnormal: the bits shifted out are zero
            mag >>= -pos;
            pos = 0;
        }
        const unsigned __int128 v = (unsigned __int128)mag << (pos % 32);
        const std::int64_t sign = x < 0 ? -1 : 1;
        for (int i = 0; i < 3; ++i) limb[pos / 32 + i] += sign * (std::int64_t)((v >> (32 * i)) & 0xffffffffu);
    }

    // carries propagated, the magnitude left in the limbs; returns the sign of the sum
    int normalize()
    {
        for (int pass = 0; pass < 2; ++pass) {
            for (int i = 0; i + 1 < LIMBS; ++i) {
                const std::int64_t carry = limb[i] >> 32;  // floor division
                limb[i] -= carry * (std::int64_t(1) << 32);
                limb[i + 1] += carry;
            }
            if (limb[LIMBS - 1] >= 0) return pass == 0 ? 1 : -1;
            for (auto& l : limb) l = -l;
        }
        return -1;
    }

    bool bit(int p) const { return p >= 0 && (limb[p / 32] >> (p % 32) & 1); }
    bool any_below(int p) const  // a bit set below position p
    {
        if (p <= 0) return false;
        for (int i = 0; i < p / 32; ++i)
            if (limb[i] != 0) return true;
        const int r = p % 32;
        return r != 0 && (limb[p / 32] & ((std::int64_t(1) << r) - 1)) != 0;
    }

    int highest() const  // the position of the leading bit of a normalized magnitude, -1 if zero
    {
        for (int i = LIMBS - 1; i >= 0; --i)
            if (limb[i] != 0) return 32 * i + 63 - __builtin_clzll((unsigned long long)limb[i]);
        return -1;
    }

    void clear_below(int p)  // a normalized magnitude truncated: the bits below position p zeroed
    {
        for (int i = 0; i < std::min(std::max(p, 0) / 32, LIMBS); ++i) limb[i] = 0;
        if (p > 0 && p / 32 < LIMBS) limb[p / 32] &= ~((std::int64_t(1) << (p % 32)) - 1);
    }
};

double exact_sum(const double* terms, int n, int precision, int mode, int group)
{
    bool finite = true, all_zero = true;
    double plain = 0;
    for (int i = 0; i < n; ++i) {
        finite &= std::isfinite(terms[i]);
        all_zero &= terms[i] == 0;
        plain += terms[i];
    }
    if (!finite || all_zero) return plain;  // NaN, inf; a sum of zeros keeps IEEE's sign of zero
    const bool toward_zero = mode != 0;
    ExactSum acc;
    if (mode == 2) {
        // a fixed-point adder as wide as the format, aligned to the largest term: each term (a
        // group of `group` doubles: one exact product) keeps the `precision` bits from the
        // largest term's leading bit down, truncated toward zero; their exact sum is truncated
        ExactSum parts[16];
        int signs[16], top = -1;
        const int count = n / group;
        if (count > 16) return std::nan("");  // the mma models pass at most 9 terms
        for (int t = 0; t < count; ++t) {
            for (int j = 0; j < group; ++j) parts[t].add(terms[t * group + j]);
            signs[t] = parts[t].normalize();
            top = std::max(top, parts[t].highest());
        }
        for (int t = 0; t < count; ++t) {
            parts[t].clear_below(top - (precision - 1));
            for (int i = 0; i < ExactSum::LIMBS; ++i) acc.limb[i] += signs[t] * parts[t].limb[i];
        }
    } else {
        for (int i = 0; i < n; ++i) acc.add(terms[i]);
    }
    const int sign = acc.normalize();
    const int high = acc.highest();
    if (high < 0) return 0.0;  // an exact zero: +0 (to nearest and toward zero alike)
    // the format's smallest ulp (subnormals) and largest exponent, as bit positions
    const int min_ulp = precision == 24 ? 1074 - 149 : 0;
    const int max_high = precision == 24 ? 1074 + 127 : 1074 + 1023;
    const double largest = precision == 24 ? 3.4028234663852886e38 : 1.7976931348623157e308;
    if (high > max_high) return sign * (toward_zero ? largest : INFINITY);
    const int ulp = std::max(high - (precision - 1), min_ulp);
    std::uint64_t q = 0;
    for (int p = high; p >= ulp; --p) q = q << 1 | (std::uint64_t)acc.bit(p);
    if (!toward_zero && acc.bit(ulp - 1) && (acc.any_below(ulp - 1) || (q & 1))) ++q;
    const double value = std::ldexp((double)q, ulp - 1074);
    if (value > largest) return sign * (toward_zero ? largest : INFINITY);
    return sign * value;
}

void trap() { fail("__trap() in " + where_am_i()); }

unsigned char* dynamic_smem() { return current->smem; }
unsigned dynamic_smem_size() { return current->smem_bytes; }

// ---- cp.async -----------------------------------------------------------------------------
void copy_async(void* dst, const void* src, int bytes, int src_bytes)
{
    Launch& L = *current;
    auto* d = static_cast<unsigned char*>(dst);
    const auto* s = static_cast<const unsigned char*>(src);
    const std::uintptr_t di = reinterpret_cast<std::uintptr_t>(d), si = reinterpret_cast<std::uintptr_t>(s);
    if (bytes != 4 && bytes != 8 && bytes != 16)
        fail("cp.async of " + std::to_string(bytes) + " bytes (4, 8 or 16) in " + where_am_i());
    if (src_bytes < 0 || src_bytes > bytes)
        fail("cp.async source size " + std::to_string(src_bytes) + " outside [0, " + std::to_string(bytes) + "] in " +
             where_am_i());
    if (di % bytes != 0 || si % bytes != 0)
        fail("cp.async of " + std::to_string(bytes) + " bytes from a misaligned " +
             (di % bytes ? "destination" : "source") + " address in " + where_am_i());
    if (d < L.smem || d + bytes > L.smem + L.smem_bytes)
        fail("cp.async destination outside the block's dynamic shared memory in " + where_am_i());
    std::memset(d, 0xff, bytes);  // undefined until the wait: NaN
    running->pending.push_back(Copy{d, s, bytes, src_bytes});
}

static void land(Fiber& f, std::size_t count)  // the oldest `count` pending copies arrive
{
    for (std::size_t i = 0; i < count; ++i) {
        const Copy& c = f.pending[i];
        std::memcpy(c.dst, c.src, c.src_bytes);
        std::memset(c.dst + c.src_bytes, 0, c.bytes - c.src_bytes);
    }
    f.pending.erase(f.pending.begin(), f.pending.begin() + count);
    for (auto& g : f.groups) g -= count;
}

void copy_async_commit() { running->groups.push_back(running->pending.size()); }

// cp.async.wait_group n: every committed group but the newest n has landed
void copy_async_wait_group(int n)
{
    Fiber& f = *running;
    if ((int)f.groups.size() <= n) return;
    const std::size_t upto = f.groups[f.groups.size() - 1 - n];
    f.groups.erase(f.groups.begin(), f.groups.end() - n);
    land(f, upto);
}

// cp.async.wait_all: commit, then wait for every group
void copy_async_wait_all()
{
    copy_async_commit();
    copy_async_wait_group(0);
}

// ---- the scheduler ----------------------------------------------------------------------------
// After a round every unfinished thread waits at a barrier: the same one, and no thread has
// finished, or the launch fails naming who is where.
static bool check_round(Launch& L, unsigned block)
{
    std::vector<std::pair<Site, std::vector<unsigned>>> at;
    std::vector<unsigned> finished;
    for (auto& f : fibers) {
        if (f->tid >= L.nthreads) break;
        if (f->state == State::done) {
            finished.push_back(f->tid);
            continue;
        }
        auto it = std::find_if(at.begin(), at.end(), [&](const auto& a) { return a.first == f->site; });
        if (it == at.end())
            at.push_back({f->site, {f->tid}});
        else
            it->second.push_back(f->tid);
    }
    if (at.empty() || (at.size() == 1 && finished.empty())) return true;
    std::string text = "threads of block " + std::to_string(block) + " reached different barriers: ";
    for (std::size_t i = 0; i < at.size(); ++i)
        text += (i ? ", thread(s) " : "thread(s) ") + ranges(at[i].second) + " wait at " + at[i].first.str();
    if (!finished.empty()) text += ", thread(s) " + ranges(finished) + " reached the end of the kernel";
    record_failure(L, text + " (a __syncthreads() that some threads skip)");
    return false;
}

static void run_block(Launch& L, unsigned b)
{
    blockIdx = dim3{b, 1, 1};
    std::memset(L.smem, 0xff, L.smem_bytes);
    L.block.store(b);
    {
        std::lock_guard<std::mutex> lock(L.mu);
        L.waiting = 0;
    }
    if (tsan()) __tsan_release(&L.sync[0]);
    for (unsigned t = 0; t < L.nthreads; ++t) start(*fibers[t]);
    for (unsigned round = 0;; ++round) {
        for (unsigned i = 0; i < L.nthreads; ++i) {
            Fiber& f = *fibers[round % 2 ? L.nthreads - 1 - i : i];
            if (f.state == State::ready) resume(L, f);
        }
        {
            std::lock_guard<std::mutex> lock(L.mu);
            L.waiting = 0;
        }
        bool all_done = true;
        for (unsigned t = 0; t < L.nthreads; ++t) all_done &= fibers[t]->state == State::done;
        if (all_done) break;
        bool ran = false;
        if (!L.failed.load() && run_collectives(L, b, ran) && ran) continue;  // those lanes go on
        if (!L.failed.load() && check_round(L, b)) {
            for (unsigned t = 0; t < L.nthreads; ++t) fibers[t]->state = State::ready;
            continue;
        }
        // failed: resume the waiting threads once more, so that they unwind (Failure)
        for (unsigned t = 0; t < L.nthreads; ++t)
            if (fibers[t]->state == State::waiting || fibers[t]->state == State::collective) {
                fibers[t]->state = State::ready;
                resume(L, *fibers[t]);
            }
    }
    if (tsan()) {
        __tsan_acquire(&L.sync[0]);
        __tsan_acquire(&L.sync[1]);
    }
}

static void run_launch(Launch& L)
{
    if (tsan() && scheduler_tsan == nullptr) scheduler_tsan = __tsan_get_current_fiber();
    while (fibers.size() < L.nthreads) {
        fibers.push_back(std::make_unique<Fiber>());
        fibers.back()->tid = (unsigned)fibers.size() - 1;
    }
    gridDim = dim3{L.grid, 1, 1};
    blockDim = dim3{L.nthreads, 1, 1};
    for (unsigned i = 0; i < L.grid && !L.failed.load(); ++i) run_block(L, block_order ? L.grid - 1 - i : i);
}

// The OS thread the launches run on, made once (the launcher thread watches it).
struct Worker {
    std::mutex mu;
    std::condition_variable wake;
    Launch* job = nullptr;
    bool started = false;

    void post(Launch* L)
    {
        std::lock_guard<std::mutex> lock(mu);
        if (!started) {
            started = true;
            std::thread([this] {
                for (;;) {
                    Launch* L;
                    {
                        std::unique_lock<std::mutex> lock(mu);
                        wake.wait(lock, [&] { return job != nullptr; });
                        L = job;
                        job = nullptr;
                    }
                    current = L;
                    run_launch(*L);
                    current = nullptr;
                    std::lock_guard<std::mutex> lock(L->mu);
                    L->done = true;
                    L->done_cv.notify_all();
                }
            }).detach();
        }
        job = L;
        wake.notify_all();
    }
};

static Worker& worker()
{
    static Worker* w = new Worker;  // never destroyed: its thread sleeps until the process ends
    return *w;
}

static std::mutex launch_mutex;  // one launch at a time

// The launcher waits for the worker and watches it: a thread that runs for `timeout` seconds
// without reaching a barrier fails the launch. If it never comes back (it spins forever), it
// cannot be stopped: the process is aborted with the message rather than left hanging.
int launch(Thunk thunk, void* kernel, unsigned grid, unsigned block, unsigned smem, void** args, double timeout)
{
    std::lock_guard<std::mutex> one_at_a_time(launch_mutex);
    Launch L;
    L.thunk = thunk;
    L.kernel = kernel;
    L.args = args;
    L.nthreads = block;
    L.grid = grid;
    L.timeout = timeout;
    L.smem_bytes = smem;
    L.smem = static_cast<unsigned char*>(std::aligned_alloc(128, smem ? (smem + 127) / 128 * 128 : 128));
    worker().post(&L);
    {
        std::unique_lock<std::mutex> lock(L.mu);
        unsigned long long seen = L.switches.load();
        auto since = std::chrono::steady_clock::now();
        const auto tick = std::chrono::duration<double>(std::min(0.1, timeout / 10));
        while (!L.done && !L.failed.load()) {
            L.done_cv.wait_for(lock, tick);
            const auto now = std::chrono::steady_clock::now();
            if (L.switches.load() != seen) {
                seen = L.switches.load();
                since = now;
            } else if (!L.done && std::chrono::duration<double>(now - since).count() >= timeout) {
                char seconds[32];
                std::snprintf(seconds, sizeof seconds, "%g", timeout);
                std::string text = "barrier timed out: thread " + std::to_string(L.running.load()) +
                                   " of block " + std::to_string(L.block.load()) + " ran for " + seconds +
                                   " s without reaching a barrier or the end of the kernel";
                if (L.waiting > 0)
                    text += "; " + std::to_string(L.waiting) + " of " + std::to_string(block) + " threads wait at " +
                            L.waiting_at.str();
                text += " (a deadlock, a barrier it skips, or an endless loop)";
                L.message = text;
                L.failed.store(true);
            }
        }
        const auto grace = std::chrono::duration<double>(timeout > 3.0 ? timeout : 3.0);
        if (!L.done_cv.wait_for(lock, grace, [&] { return L.done; })) {
            std::fprintf(stderr, "lorakern CUDA emulation: %s; thread %u is still running, aborting\n",
                         L.message.c_str(), L.running.load());
            std::fflush(stderr);
            std::abort();
        }
    }
    std::free(L.smem);
    if (L.failed.load()) {
        error_text = L.message;
        return 1;
    }
    return 0;
}

const char* last_error() { return error_text.c_str(); }

}  // namespace lk_emu

extern "C" void emu_set_mma_rounding(int policy) { lk_emu::rounding_policy = policy; }
extern "C" void emu_set_block_order(int order) { lk_emu::block_order = order; }

#endif  // LORAKERN_EMULATION_RUNTIME
