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
//   races           under ThreadSanitizer (modules built with -fsanitize=thread, libtsan
//                   loaded) each thread is a TSan fiber and each barrier orders exactly what a
//                   __syncthreads orders: two threads touching the same memory between two
//                   barriers, one of them writing, fail (ci/emulation_tsan.py).
//
// What it cannot check: timing, warp-synchronous code (there are no warps here), memory order
// between blocks (they run one after another), the PTX paths (the asm is not compiled).
//
// Two parts. The declarations below are all a module sees: they parse fast, so that each of
// the many template instances the tests ask for compiles in a second or so. The runtime
// (fibers, barriers, copies, the launcher) is the part under LORAKERN_EMULATION_RUNTIME,
// compiled once into a library every module links against.
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

enum class State { ready, waiting, done };

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
        if (!L.failed.load() && check_round(L, b)) {
            for (unsigned t = 0; t < L.nthreads; ++t) fibers[t]->state = State::ready;
            continue;
        }
        // failed: resume the waiting threads once more, so that they unwind (Failure)
        for (unsigned t = 0; t < L.nthreads; ++t)
            if (fibers[t]->state == State::waiting) {
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
    for (unsigned b = 0; b < L.grid && !L.failed.load(); ++b) run_block(L, b);
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

#endif  // LORAKERN_EMULATION_RUNTIME
