// The host GPU's kernel side (see tests/support/gpu_on_host.rs): makes CUDA C compile as
// C++ and run on one CPU thread. Included before the kernels' prelude and sources.
//
// A launch runs its blocks one after another. A kernel without barriers runs a block's
// threads one after another; a kernel with `__syncthreads` runs each of them as a fiber
// (its own stack, switched by a few instructions of x86-64 assembly, no system call),
// and every fiber that reaches the barrier yields until all of the block's have, exactly
// the barrier's contract. `__shared__` variables are function statics: one block runs at a
// time, so one copy is the block's. Launches from different host threads (and from the
// threads of streams made with cuStreamCreate) take turns.
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <mutex>
#include <vector>

#if !defined(__x86_64__)
#error "the host GPU switches fibers with x86-64 assembly"
#endif

struct tessera_dim3 { unsigned int x, y, z; };
static tessera_dim3 blockIdx, threadIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

// One OS thread runs every GPU thread, so plain arithmetic is atomic.
static inline float atomicAdd(float* at, float v) { float old = *at; *at = old + v; return old; }
static inline unsigned int atomicAdd(unsigned int* at, unsigned int v) {
    unsigned int old = *at;
    *at = old + v;
    return old;
}
static inline float __int_as_float(int v) { float f; memcpy(&f, &v, sizeof f); return f; }

// Saves the callee-saved registers on the current stack, stores the stack pointer in
// `*from`, switches to the stack `to` and restores the registers saved there.
extern "C" void tessera_switch(void** from, void* to);
asm(R"(
    .text
    .globl tessera_switch
    .type tessera_switch, @function
tessera_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size tessera_switch, .-tessera_switch
)");

namespace tessera_fibers {
constexpr size_t STACK = 64 * 1024;
struct Fiber {
    void* sp = nullptr;
    char* stack = nullptr;
    bool done = false;
};
static std::vector<Fiber> fibers;
static void* scheduler_sp = nullptr;
static unsigned int current = 0;
static void (*body)(void**) = nullptr;
static void** params = nullptr;

[[noreturn]] static void start() {
    body(params);
    fibers[current].done = true;
    tessera_switch(&fibers[current].sp, scheduler_sp);
    abort();  // a finished fiber is never resumed
}

// A fresh stack whose first switch "returns" into `start`: six zero registers, then
// `start`'s address at a 16-byte aligned slot (so `start` sees the stack of a call).
static void prepare(Fiber& fiber) {
    if (fiber.stack == nullptr) {
        fiber.stack = static_cast<char*>(malloc(STACK));
        if (fiber.stack == nullptr) abort();
    }
    uintptr_t top = (reinterpret_cast<uintptr_t>(fiber.stack) + STACK) & ~uintptr_t(15);
    void** slot = reinterpret_cast<void**>(top - 16);
    slot[0] = reinterpret_cast<void*>(&start);
    slot[1] = nullptr;
    void** sp = slot - 6;
    for (int i = 0; i < 6; ++i) sp[i] = nullptr;
    fiber.sp = sp;
    fiber.done = false;
}

// Runs `run(params)` as every thread of one block of `threads` fibers.
static void run_block(unsigned int threads, void (*run)(void**), void** args) {
    if (fibers.size() < threads) fibers.resize(threads);
    body = run;
    params = args;
    for (unsigned int t = 0; t < threads; ++t) prepare(fibers[t]);
    for (bool all_done = false; !all_done;) {
        all_done = true;
        for (unsigned int t = 0; t < threads; ++t) {
            if (fibers[t].done) continue;
            current = t;
            threadIdx = {t, 0, 0};
            tessera_switch(&scheduler_sp, fibers[t].sp);
            all_done = all_done && fibers[t].done;
        }
    }
}
}  // namespace tessera_fibers

static inline void tessera_syncthreads() {
    using namespace tessera_fibers;
    tessera_switch(&fibers[current].sp, scheduler_sp);
    threadIdx = {current, 0, 0};
}
#define __syncthreads() tessera_syncthreads()

// One kernel as the driver's module table lists it: `run` unpacks the launch's parameter
// array into the kernel's arguments.
struct tessera_kernel {
    const char* name;
    void (*run)(void**);
    bool syncs;
    size_t params;        // how many parameters it takes
    const size_t* sizes;  // each parameter's size in bytes
};

// A launch of `kernel` over `grid` blocks of `block` threads. Launches from several host
// threads (replicas sharing the device) run one at a time: the built-in variables and the
// fibers are the process's.
static void tessera_launch(const tessera_kernel& kernel, unsigned int grid, unsigned int block, void** args) {
    static std::mutex one_launch_at_a_time;
    std::lock_guard<std::mutex> launching(one_launch_at_a_time);
    gridDim = {grid, 1, 1};
    blockDim = {block, 1, 1};
    for (unsigned int b = 0; b < grid; ++b) {
        blockIdx = {b, 0, 0};
        if (kernel.syncs) {
            tessera_fibers::run_block(block, kernel.run, args);
        } else {
            for (unsigned int t = 0; t < block; ++t) {
                threadIdx = {t, 0, 0};
                kernel.run(args);
            }
        }
    }
}
