// Host emulation of the CUDA kernels in fused.cu (and of small test kernels): compiled by g++,
// one OS thread per CUDA thread, the blocks of a grid one after another. emulation.py puts
// this header in front of a module's source (loss prelude + fused.cu) and adds a wrapper per
// kernel; the launcher and the kernels' index arithmetic, tails and reductions then run
// without a GPU. The emulation is stricter than a GPU on purpose, so that a bug the hardware
// happens to hide shows up in the results or as an error:
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
//                   the end of the kernel, fail at once naming both places. A barrier that
//                   sees no new arrival for `timeout` seconds fails too (a thread that never
//                   comes: a deadlock). A failure ends the launch with an error message
//                   (HostRuntime raises EmulationError), never a hang.
//   races           every synchronisation is a mutex or an acquire/release atomic, which
//                   ThreadSanitizer understands: built with -fsanitize=thread, two threads
//                   touching the same memory between two barriers (one of them writing) fail.
//
// What it cannot check: timing, warp-synchronous code (there are no warps here), memory order
// between blocks (they run one after another), the PTX paths (the asm is not compiled).
//
// Two parts. The declarations below are all a module sees: they parse fast, so that each of
// the many template instances the tests ask for compiles in a second or two. The runtime
// (barriers, copies, the launcher and its thread pool) is the part under
// LORAKERN_EMULATION_RUNTIME, compiled once into a library every module links against.
#ifndef LORAKERN_EMULATION_H
#define LORAKERN_EMULATION_H

#include <cmath>
#include <cstddef>
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
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline double __dsub_rn(double a, double b) { return a - b; }

#endif  // LORAKERN_EMULATION_H

// ==== the runtime =============================================================================
#if defined(LORAKERN_EMULATION_RUNTIME) && !defined(LORAKERN_EMULATION_RUNTIME_DONE)
#define LORAKERN_EMULATION_RUNTIME_DONE

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

thread_local dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

namespace lk_emu {

// A place in the source where threads meet: a __syncthreads() call site, or the launcher's own
// points (the start of a block, the end of the kernel).
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

struct Failure {};  // unwinds a thread once its launch has failed

struct Copy {  // one cp.async: `bytes` to dst, the first `src_bytes` of them from src
    unsigned char* dst;
    const unsigned char* src;
    int bytes, src_bytes;
};

// The state the threads of one launch share. Arrivals at a barrier go through `mu` (the site
// check and the bookkeeping); the waiting is on the atomic `generation`, which the last thread
// to arrive advances (release) and the waiters read (acquire): ThreadSanitizer sees each
// barrier as the synchronisation it is, and waking 256 threads does not queue them on a mutex.
struct Launch {
    Thunk thunk = nullptr;
    void* kernel = nullptr;
    void** args = nullptr;
    unsigned nthreads = 0, grid = 0;
    double timeout = 5.0;  // seconds without a new arrival at a barrier
    unsigned char* smem = nullptr;
    unsigned smem_bytes = 0;

    std::mutex mu;
    std::condition_variable done;          // the launcher waits on it for `finished`
    unsigned arrived = 0;                  // at the current barrier (under mu)
    unsigned long long arrivals = 0;       // ever (under mu): the launcher's watchdog reads it
    Site site;                             // of the barrier the arrived threads wait at
    std::vector<char> here;                // here[t]: thread t waits at `site`
    std::atomic<unsigned> generation{0};  // 32 bits: waits on a futex (64-bit atomics wait on a mutex)
    std::atomic<bool> failed{false};
    std::string message;                   // the first failure (under mu)
    unsigned finished = 0;                 // threads that left the launch (under mu)
};

static Launch* current = nullptr;  // set while a launch runs (workers read it after the job's acquire)
static std::string error_text;     // of the last failed launch

struct ThreadState {
    std::vector<Copy> pending;          // issued cp.async copies that have not landed
    std::vector<std::size_t> groups;    // pending.size() at each commit, oldest first
};
static thread_local ThreadState self;

static std::string ranges(const std::vector<unsigned>& ids)
{
    std::string out;
    for (std::size_t i = 0; i < ids.size();) {
        std::size_t j = i;
        while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
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

// record the launch's first failure (L.mu held) and wake every thread waiting at a barrier
static void fail_locked(Launch& L, const std::string& what)
{
    if (!L.failed.load()) {
        L.message = what;
        L.failed.store(true);
    }
    L.generation.fetch_add(1);
    L.generation.notify_all();
    L.done.notify_all();
}

[[noreturn]] static void fail(const std::string& what)
{
    Launch& L = *current;
    {
        std::lock_guard<std::mutex> lock(L.mu);
        fail_locked(L, what);
    }
    throw Failure{};
}

// every thread of the block arrives here from the same site, or the launch fails
static void barrier(const Site& site)
{
    Launch& L = *current;
    const unsigned tid = threadIdx.x;
    unsigned generation;
    {
        std::lock_guard<std::mutex> lock(L.mu);
        if (L.failed.load()) throw Failure{};
        if (L.arrived > 0 && !(L.site == site)) {
            std::vector<unsigned> there;
            for (unsigned t = 0; t < L.nthreads; ++t)
                if (L.here[t]) there.push_back(t);
            fail_locked(L, "threads of block " + std::to_string(blockIdx.x) + " reached different barriers: thread(s) " +
                               ranges(there) + " wait at " + L.site.str() + ", thread " + std::to_string(tid) +
                               " reached " + site.str() + " (a __syncthreads() that some threads skip)");
            throw Failure{};
        }
        L.site = site;
        L.here[tid] = 1;
        ++L.arrivals;
        generation = L.generation.load(std::memory_order_relaxed);
        if (++L.arrived == L.nthreads) {
            L.arrived = 0;
            std::fill(L.here.begin(), L.here.end(), 0);
            L.generation.fetch_add(1, std::memory_order_acq_rel);
            L.generation.notify_all();
            return;
        }
    }
    while (L.generation.load(std::memory_order_acquire) == generation)
        L.generation.wait(generation, std::memory_order_acquire);
    if (L.failed.load()) throw Failure{};
}

void barrier_at(const char* file, int line) { barrier(Site{file, line, "__syncthreads()"}); }

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
    self.pending.push_back(Copy{d, s, bytes, src_bytes});
}

static void land(std::size_t count)  // the oldest `count` pending copies arrive
{
    for (std::size_t i = 0; i < count; ++i) {
        const Copy& c = self.pending[i];
        std::memcpy(c.dst, c.src, c.src_bytes);
        std::memset(c.dst + c.src_bytes, 0, c.bytes - c.src_bytes);
    }
    self.pending.erase(self.pending.begin(), self.pending.begin() + count);
    for (auto& g : self.groups) g -= count;
}

void copy_async_commit() { self.groups.push_back(self.pending.size()); }

// cp.async.wait_group n: every committed group but the newest n has landed
void copy_async_wait_group(int n)
{
    if ((int)self.groups.size() <= n) return;
    const std::size_t upto = self.groups[self.groups.size() - 1 - n];
    self.groups.erase(self.groups.begin(), self.groups.end() - n);
    land(upto);
}

// cp.async.wait_all: commit, then wait for every group
void copy_async_wait_all()
{
    copy_async_commit();
    copy_async_wait_group(0);
}

// ---- the launcher ---------------------------------------------------------------------------
// The launcher's watchdog (L.mu held): a barrier that threads wait at and nobody has arrived at
// for `timeout` seconds fails the launch.
static void check_progress(Launch& L, unsigned long long& seen, std::chrono::steady_clock::time_point& since)
{
    const auto now = std::chrono::steady_clock::now();
    if (L.arrivals != seen || L.arrived == 0) {
        seen = L.arrivals;
        since = now;
        return;
    }
    if (std::chrono::duration<double>(now - since).count() < L.timeout) return;
    std::vector<unsigned> missing;
    for (unsigned t = 0; t < L.nthreads; ++t)
        if (!L.here[t]) missing.push_back(t);
    char seconds[32];
    std::snprintf(seconds, sizeof seconds, "%g", L.timeout);
    fail_locked(L, "barrier timed out: " + std::to_string(L.arrived) + " of " + std::to_string(L.nthreads) +
                       " threads wait at " + L.site.str() + " and none arrived for " + seconds + " s; thread(s) " +
                       ranges(missing) + " never came (a deadlock, or a barrier they skip)");
}

// what CUDA thread t does in a launch: every block of the grid, in order
static void run_thread(Launch& L, unsigned t)
{
    static const Site start{nullptr, 0, "the start of a block"};
    static const Site end{nullptr, 0, "the end of the kernel"};
    threadIdx = dim3{t, 1, 1};
    try {
        for (unsigned b = 0; b < L.grid; ++b) {
            blockIdx = dim3{b, 1, 1};
            if (t == 0) std::memset(L.smem, 0xff, L.smem_bytes);
            barrier(start);
            self.pending.clear();
            self.groups.clear();
            L.thunk(L.kernel, L.args);
            if (!self.pending.empty())
                fail(std::to_string(self.pending.size()) + " cp.async copies issued by " + where_am_i() +
                     " were never waited for");
            barrier(end);
        }
    } catch (const Failure&) {
    } catch (const std::exception& e) {
        std::lock_guard<std::mutex> lock(L.mu);
        fail_locked(L, std::string("exception in ") + where_am_i() + ": " + e.what());
    }
    std::lock_guard<std::mutex> lock(L.mu);
    ++L.finished;
    L.done.notify_all();
}

// The OS threads, made once and reused by every launch (made and joined per launch they cost
// more than the kernels at the tests' sizes). Never destroyed: they sleep until the process ends.
struct Pool {
    std::mutex mu;
    std::condition_variable wake;
    std::vector<std::thread> threads;
    Launch* job = nullptr;
    unsigned long long job_id = 0;

    void grow(unsigned n)
    {
        while (threads.size() < n) {
            const unsigned t = (unsigned)threads.size();
            threads.emplace_back([this, t] {
                unsigned long long seen = 0;
                for (;;) {
                    Launch* L;
                    {
                        std::unique_lock<std::mutex> lock(mu);
                        wake.wait(lock, [&] { return job_id != seen; });
                        seen = job_id;
                        L = job;
                    }
                    if (L != nullptr && t < L->nthreads) run_thread(*L, t);
                }
            });
            threads.back().detach();
        }
    }
};

static Pool& pool()
{
    static Pool* p = new Pool;  // leaked on purpose: its threads outlive every static destructor
    return *p;
}

static std::mutex launch_mutex;  // one launch at a time

// A thread that never returns after a failure (it spins forever) cannot be stopped: the
// process is aborted with the message rather than left hanging.
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
    L.here.assign(block, 0);
    L.smem_bytes = smem;
    // exactly `smem` bytes (rounded to 128), so AddressSanitizer sees any overrun
    L.smem = static_cast<unsigned char*>(std::aligned_alloc(128, smem ? (smem + 127) / 128 * 128 : 128));
    current = &L;
    gridDim = dim3{grid, 1, 1};
    blockDim = dim3{block, 1, 1};
    Pool& P = pool();
    {
        std::lock_guard<std::mutex> lock(P.mu);
        P.grow(block);
        P.job = &L;
        ++P.job_id;
    }
    P.wake.notify_all();
    {
        // wait for the threads, watching the barriers; after a failure, give them `timeout`
        // (at least 3 s) to leave
        std::unique_lock<std::mutex> lock(L.mu);
        unsigned long long seen = 0;
        auto since = std::chrono::steady_clock::now();
        const auto tick = std::chrono::duration<double>(std::min(0.1, timeout / 10));
        while (L.finished < block && !L.failed.load()) {
            L.done.wait_for(lock, tick);
            check_progress(L, seen, since);
        }
        const auto grace = std::chrono::duration<double>(timeout > 3.0 ? timeout : 3.0);
        if (!L.done.wait_for(lock, grace, [&] { return L.finished == block; })) {
            std::fprintf(stderr, "lorakern CUDA emulation: %s; %u thread(s) still running, aborting\n",
                         L.message.c_str(), block - L.finished);
            std::fflush(stderr);
            std::abort();
        }
    }
    {
        std::lock_guard<std::mutex> lock(P.mu);
        P.job = nullptr;
    }
    std::free(L.smem);
    current = nullptr;
    if (L.failed.load()) {
        error_text = L.message;
        return 1;
    }
    return 0;
}

const char* last_error() { return error_text.c_str(); }

}  // namespace lk_emu

#endif  // LORAKERN_EMULATION_RUNTIME
