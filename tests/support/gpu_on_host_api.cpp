// The host GPU's library side (see tests/support/gpu_on_host.rs): the CUDA driver,
// cuBLAS, cuBLASLt, cuSPARSE and NCCL functions Tessera's GPU code reaches, on host memory.
// Included after the kernels and their table (`tessera_kernels`, `tessera_kernel_count`);
// the library built from it answers to the names libcuda.so, libcublas.so,
// libcublasLt.so, libcusparse.so and libnccl.so.
//
// TESSERA_HOST_GPU_DEVICES devices (default 1) share this host's memory: a device pointer
// is a host address. Every operation on the default stream runs when it is called (streams
// made with cuStreamCreate lag behind: see "Streams made with cuStreamCreate"), kernels run
// through `tessera_launch`, and matrix
// products follow cuBLAS's column-major definitions (cuBLASLt: bf16 with f32 accumulation; cuSPARSE: 32-bit CSR times a vector
// or a dense matrix; NCCL: float32 sums, broadcasts and gathers between ranks in any
// processes, through shared memory). Error codes are the libraries' own. Not here:
// whatever Tessera does not call (a missing symbol, named by cudarc's panic).
#include <fcntl.h>
#include <linux/futex.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <climits>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <new>
#include <unordered_map>
#include <vector>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef void* CUcontext;
typedef void* CUstream;
typedef void* CUmodule;
typedef void* CUevent;
typedef const tessera_kernel* CUfunction;

enum : CUresult {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_CONTEXT = 201,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_ILLEGAL_STATE = 401,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_NOT_READY = 600,
    CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES = 701,
};

static int tessera_context_tokens[8];  // device d's context handle points at element d

// TESSERA_HOST_GPU_DEVICES devices (1 to 8, default 1), all of them this host's memory.
static int tessera_devices() {
    const char* wanted = getenv("TESSERA_HOST_GPU_DEVICES");
    int n = wanted != nullptr ? atoi(wanted) : 1;
    return n < 1 ? 1 : n > 8 ? 8 : n;
}
static thread_local CUcontext tessera_current = nullptr;
static const size_t TESSERA_MEMORY = size_t(16) << 30;

static double tessera_now_ms() {
    using clock = std::chrono::steady_clock;
    return std::chrono::duration<double, std::milli>(clock::now().time_since_epoch()).count();
}

// Work a device has queued and not done: NCCL collectives after their host part run on
// threads of their own, as they would on a GPU, and every later operation on that device
// waits for them first (the order of its one stream); an event recorded behind one is not
// ready until it finished. Everything else is done when it is queued.
struct tessera_device_queue {
    std::mutex lock;
    std::condition_variable finished;
    uint64_t queued = 0, completed = 0;     // every ticket up to `completed` is done
    std::vector<double> completed_at{0.0};  // completed_at[ticket]: when it finished (ms), else 0
    // The default stream's copies and fills into device memory, numbered; the last 256.
    uint64_t writes = 0;
    struct { CUdeviceptr begin, end; uint64_t write; } recent[256] = {};
};
static tessera_device_queue tessera_queues[8];

// The calling thread's current device, or -1.
static int tessera_current_device() {
    if (tessera_current == nullptr) return -1;
    return int(static_cast<int*>(tessera_current) - tessera_context_tokens);
}
// A ticket for work queued on device `d` now.
static uint64_t tessera_enqueue(int d) {
    std::lock_guard<std::mutex> locked(tessera_queues[d].lock);
    return ++tessera_queues[d].queued;
}
// Marks ticket `ticket` of device `d` done. As on a stream, work behind an earlier ticket
// (of another communicator on the device) counts as done only once that one is.
static void tessera_finish(int d, uint64_t ticket) {
    auto& q = tessera_queues[d];
    {
        std::lock_guard<std::mutex> locked(q.lock);
        if (q.completed_at.size() <= ticket) q.completed_at.resize(ticket + 1, 0.0);
        q.completed_at[ticket] = tessera_now_ms();
        while (q.completed + 1 < q.completed_at.size() && q.completed_at[q.completed + 1] > 0.0) ++q.completed;
    }
    q.finished.notify_all();
}
// Waits until device `d` did ticket `ticket`.
static void tessera_wait_for(int d, uint64_t ticket) {
    auto& q = tessera_queues[d];
    std::unique_lock<std::mutex> locked(q.lock);
    q.finished.wait(locked, [&] { return q.completed >= ticket; });
}
// Waits for everything queued on the calling thread's current device.
static void tessera_fence() {
    int d = tessera_current_device();
    if (d < 0) return;
    uint64_t ticket;
    {
        std::lock_guard<std::mutex> locked(tessera_queues[d].lock);
        ticket = tessera_queues[d].queued;
    }
    tessera_wait_for(d, ticket);
}
// Notes a copy or fill of the default stream into [at, at + n) on the current device.
static void tessera_note_write(CUdeviceptr at, size_t n) {
    int d = tessera_current_device();
    if (d < 0 || n == 0) return;
    auto& q = tessera_queues[d];
    std::lock_guard<std::mutex> locked(q.lock);
    ++q.writes;
    q.recent[q.writes % 256] = {at, at + n, q.writes};
}

// --- Streams made with cuStreamCreate ---------------------------------------------------
//
// Work on the default stream (the null handle) runs when it is called. A stream made with
// cuStreamCreate is a queue that a thread of its own works through in order, each piece
// TESSERA_HOST_GPU_STREAM_LAG_MS (default 20) after it was queued, or at once when the host
// or the default stream waits for it (cuStreamSynchronize, cuEventSynchronize,
// cuStreamWaitEvent on the default stream, cuCtxSynchronize, cuMemFree). So such a stream
// lags behind the default one, as a GPU's second stream may: default-stream work that reads
// what it writes without waiting for an event recorded after the write reads stale values,
// and the tests that compare results show it. The other way round, work queued on such a
// stream that reads device memory the default stream copied or filled (with cuMemcpy* or
// cuMemset*), before the stream waited for an event recorded after that write, is refused
// with a message: the missing cuStreamWaitEvent would be a race on a GPU. (Kernels' writes
// are not tracked so.) cuBLAS and cuSPARSE run on the default stream only.
struct tessera_stream_work {
    uint64_t ticket;
    double due_ms;
    std::function<void()> run;
};
struct tessera_stream {
    int device = -1;
    std::mutex lock;
    std::condition_variable changed;
    std::deque<tessera_stream_work> pending;
    uint64_t queued = 0, completed = 0, forced = 0;  // tickets; every one up to `completed` is done
    std::vector<double> completed_at{0.0};         // completed_at[ticket]: when it was done (ms)
    uint64_t writes_waited = 0;  // the default stream's writes it has waited for
    bool closing = false;
    std::thread worker;
};
// Streams made and not destroyed. A destroyed one's memory is kept: events may name it.
static std::mutex tessera_streams_lock;
static std::vector<tessera_stream*> tessera_streams;

static double tessera_stream_lag_ms() {
    static const double lag = [] {
        const char* wanted = getenv("TESSERA_HOST_GPU_STREAM_LAG_MS");
        return wanted != nullptr ? atof(wanted) : 20.0;
    }();
    return lag;
}
// The stream's thread: runs each piece of work when it is due or waited for.
static void tessera_stream_work_through(tessera_stream* s) {
    std::unique_lock<std::mutex> locked(s->lock);
    for (;;) {
        s->changed.wait(locked, [&] { return s->closing || !s->pending.empty(); });
        if (s->pending.empty()) return;
        uint64_t ticket = s->pending.front().ticket;
        double due = s->pending.front().due_ms;
        while (s->forced < ticket && !s->closing) {
            double left = due - tessera_now_ms();
            if (left <= 0) break;
            s->changed.wait_for(locked, std::chrono::duration<double, std::milli>(left));
        }
        std::function<void()> run = std::move(s->pending.front().run);
        s->pending.pop_front();
        locked.unlock();
        run();
        run = nullptr;  // what it holds goes before the work counts as done
        locked.lock();
        s->completed = ticket;
        if (s->completed_at.size() <= ticket) s->completed_at.resize(ticket + 1, 0.0);
        s->completed_at[ticket] = tessera_now_ms();
        s->changed.notify_all();
    }
}
// `stream` as made by cuStreamCreate into `*made` (nullptr for the default stream: the null
// handle, CU_STREAM_LEGACY or CU_STREAM_PER_THREAD); false if it is no stream.
static bool tessera_stream_of(CUstream stream, tessera_stream** made) {
    *made = nullptr;
    if (reinterpret_cast<uintptr_t>(stream) <= 2) return true;
    std::lock_guard<std::mutex> locked(tessera_streams_lock);
    for (tessera_stream* s : tessera_streams) {
        if (s == stream) {
            *made = s;
            return true;
        }
    }
    return false;
}
// Queues `run` on stream `s`.
static void tessera_stream_queue(tessera_stream* s, std::function<void()> run) {
    std::lock_guard<std::mutex> locked(s->lock);
    uint64_t ticket = ++s->queued;
    s->pending.push_back({ticket, tessera_now_ms() + tessera_stream_lag_ms(), std::move(run)});
    s->changed.notify_all();
}
// Runs stream `s`'s work up to ticket `ticket` without the lag, and waits for it.
static void tessera_stream_force(tessera_stream* s, uint64_t ticket) {
    std::unique_lock<std::mutex> locked(s->lock);
    if (ticket > s->forced) s->forced = ticket;
    s->changed.notify_all();
    s->changed.wait(locked, [&] { return s->completed >= ticket; });
}
// Runs all the work queued on the current device's streams, and waits for it.
static void tessera_force_device_streams() {
    int d = tessera_current_device();
    if (d < 0) return;
    std::vector<std::pair<tessera_stream*, uint64_t>> mine;
    {
        std::lock_guard<std::mutex> locked(tessera_streams_lock);
        for (tessera_stream* s : tessera_streams) {
            if (s->device != d) continue;
            std::lock_guard<std::mutex> queue_locked(s->lock);
            mine.push_back({s, s->queued});
        }
    }
    for (auto [s, ticket] : mine) tessera_stream_force(s, ticket);
}
// Whether stream `s` reading [at, at + n) now would race with a copy or fill of the default
// stream that it did not wait for (reported on stderr, naming `what`).
static bool tessera_reads_unwaited(tessera_stream* s, const void* at, size_t n, const char* what) {
    uint64_t waited;
    {
        std::lock_guard<std::mutex> locked(s->lock);
        waited = s->writes_waited;
    }
    CUdeviceptr begin = reinterpret_cast<CUdeviceptr>(at), end = begin + n;
    auto& q = tessera_queues[s->device];
    std::lock_guard<std::mutex> locked(q.lock);
    for (const auto& w : q.recent) {
        if (w.write > waited && w.begin < end && begin < w.end) {
            fprintf(stderr,
                    "host GPU: %s queued on a stream reads device memory at %p (%zu bytes) that the default "
                    "stream wrote after the last event this stream waited for: a race on a GPU (a missing "
                    "cuStreamWaitEvent)\n",
                    what, at, n);
            return true;
        }
    }
    return false;
}

extern "C" {
CUresult cuStreamCreate(CUstream* stream, unsigned int) {
    if (stream == nullptr) return CUDA_ERROR_INVALID_VALUE;
    int d = tessera_current_device();
    if (d < 0) return CUDA_ERROR_INVALID_CONTEXT;
    auto* s = new (std::nothrow) tessera_stream();
    if (s == nullptr) return CUDA_ERROR_OUT_OF_MEMORY;
    s->device = d;
    s->worker = std::thread(tessera_stream_work_through, s);
    {
        std::lock_guard<std::mutex> locked(tessera_streams_lock);
        tessera_streams.push_back(s);
    }
    *stream = s;
    return CUDA_SUCCESS;
}
CUresult cuStreamCreateWithPriority(CUstream* stream, unsigned int flags, int) { return cuStreamCreate(stream, flags); }
// Finishes the stream's work (as the driver does before it frees a stream), then stops it.
CUresult cuStreamDestroy_v2(CUstream stream) {
    tessera_stream* s;
    if (!tessera_stream_of(stream, &s) || s == nullptr) return CUDA_ERROR_INVALID_HANDLE;
    {
        std::lock_guard<std::mutex> locked(tessera_streams_lock);
        for (size_t i = 0; i < tessera_streams.size(); ++i) {
            if (tessera_streams[i] == s) {
                tessera_streams.erase(tessera_streams.begin() + long(i));
                break;
            }
        }
    }
    {
        std::lock_guard<std::mutex> locked(s->lock);
        s->closing = true;
        s->changed.notify_all();
    }
    s->worker.join();
    return CUDA_SUCCESS;
}
}  // extern "C"

static const char* tessera_error_text(CUresult error, bool name) {
    switch (error) {
    case CUDA_SUCCESS: return name ? "CUDA_SUCCESS" : "no error";
    case CUDA_ERROR_INVALID_VALUE: return name ? "CUDA_ERROR_INVALID_VALUE" : "invalid argument";
    case CUDA_ERROR_OUT_OF_MEMORY: return name ? "CUDA_ERROR_OUT_OF_MEMORY" : "out of memory";
    case CUDA_ERROR_INVALID_DEVICE: return name ? "CUDA_ERROR_INVALID_DEVICE" : "invalid device ordinal";
    case CUDA_ERROR_INVALID_HANDLE: return name ? "CUDA_ERROR_INVALID_HANDLE" : "invalid resource handle";
    case CUDA_ERROR_NOT_FOUND: return name ? "CUDA_ERROR_NOT_FOUND" : "named symbol not found";
    case CUDA_ERROR_NOT_READY: return name ? "CUDA_ERROR_NOT_READY" : "device not ready";
    case CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES:
        return name ? "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES" : "too many resources requested for launch";
    default: return nullptr;
    }
}

extern "C" {

// --- Driver: errors, devices, the primary context ---------------------------------------

CUresult cuGetErrorName(CUresult error, const char** out) {
    if (out == nullptr || (*out = tessera_error_text(error, true)) == nullptr) return CUDA_ERROR_INVALID_VALUE;
    return CUDA_SUCCESS;
}
CUresult cuGetErrorString(CUresult error, const char** out) {
    if (out == nullptr || (*out = tessera_error_text(error, false)) == nullptr) return CUDA_ERROR_INVALID_VALUE;
    return CUDA_SUCCESS;
}
CUresult cuInit(unsigned int) { return CUDA_SUCCESS; }
CUresult cuDriverGetVersion(int* version) {
    if (version == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *version = 12080;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetCount(int* count) {
    if (count == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *count = tessera_devices();
    return CUDA_SUCCESS;
}
CUresult cuDeviceGet(CUdevice* device, int ordinal) {
    if (device == nullptr) return CUDA_ERROR_INVALID_VALUE;
    if (ordinal < 0 || ordinal >= tessera_devices()) return CUDA_ERROR_INVALID_DEVICE;
    *device = ordinal;
    return CUDA_SUCCESS;
}
static bool tessera_valid(CUdevice device) { return device >= 0 && device < tessera_devices(); }
CUresult cuDeviceGetName(char* name, int len, CUdevice device) {
    if (name == nullptr || len <= 0 || !tessera_valid(device)) return CUDA_ERROR_INVALID_VALUE;
    strncpy(name, "Tessera host GPU", size_t(len));
    name[len - 1] = '\0';
    return CUDA_SUCCESS;
}
CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice device) {
    if (bytes == nullptr || !tessera_valid(device)) return CUDA_ERROR_INVALID_VALUE;
    *bytes = TESSERA_MEMORY;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetAttribute(int* value, int attribute, CUdevice device) {
    if (value == nullptr || !tessera_valid(device)) return CUDA_ERROR_INVALID_VALUE;
    switch (attribute) {
    case 1: *value = 1024; break;   // max threads per block
    case 10: *value = 32; break;    // warp size
    case 16: *value = 1; break;     // multiprocessors
    case 75: *value = 9; break;     // compute capability 9.0: NVRTC makes sm_90 code
    case 76: *value = 0; break;
    case 115: *value = 0; break;    // no memory pools: cudarc allocates synchronously
    default: *value = 0; break;
    }
    return CUDA_SUCCESS;
}
CUresult cuDevicePrimaryCtxRetain(CUcontext* context, CUdevice device) {
    if (context == nullptr || !tessera_valid(device)) return CUDA_ERROR_INVALID_VALUE;
    *context = &tessera_context_tokens[device];
    return CUDA_SUCCESS;
}
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return CUDA_SUCCESS; }
CUresult cuCtxSetCurrent(CUcontext context) {
    tessera_current = context;
    return CUDA_SUCCESS;
}
CUresult cuCtxGetCurrent(CUcontext* context) {
    if (context == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *context = tessera_current;
    return CUDA_SUCCESS;
}
CUresult cuCtxPushCurrent_v2(CUcontext context) { return cuCtxSetCurrent(context); }
CUresult cuCtxSynchronize() {
    tessera_force_device_streams();
    tessera_fence();
    return CUDA_SUCCESS;
}
// Bytes allocated and not freed: what the device's free memory reports.
static std::mutex tessera_memory_lock;
static std::unordered_map<void*, size_t> tessera_allocations;
static size_t tessera_allocated = 0;

CUresult cuMemGetInfo_v2(size_t* free, size_t* total) {
    if (free == nullptr || total == nullptr) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> locked(tessera_memory_lock);
    *total = TESSERA_MEMORY;
    *free = TESSERA_MEMORY - tessera_allocated;
    return CUDA_SUCCESS;
}

// --- Memory and copies (host memory; every copy completes when called) -------------------

CUresult cuMemAlloc_v2(CUdeviceptr* pointer, size_t bytes) {
    if (pointer == nullptr) return CUDA_ERROR_INVALID_VALUE;
    if (bytes == 0) return CUDA_ERROR_INVALID_VALUE;  // as the driver: no zero-byte buffers
    size_t rounded = (bytes + 255) / 256 * 256;
    {
        std::lock_guard<std::mutex> locked(tessera_memory_lock);
        if (rounded > TESSERA_MEMORY - tessera_allocated) return CUDA_ERROR_OUT_OF_MEMORY;
    }
    void* memory = aligned_alloc(256, rounded);
    if (memory == nullptr) return CUDA_ERROR_OUT_OF_MEMORY;
    {
        std::lock_guard<std::mutex> locked(tessera_memory_lock);
        tessera_allocations[memory] = rounded;
        tessera_allocated += rounded;
    }
    // Fresh device memory holds garbage: all ones (NaN as floats, -1 as integers), so that
    // reading it before writing it shows.
    memset(memory, 0xFF, bytes);
    *pointer = reinterpret_cast<CUdeviceptr>(memory);
    return CUDA_SUCCESS;
}
CUresult cuMemFree_v2(CUdeviceptr pointer) {
    // As the driver's, a synchronous free waits for the device's work, on every stream.
    tessera_force_device_streams();
    tessera_fence();
    void* memory = reinterpret_cast<void*>(pointer);
    {
        std::lock_guard<std::mutex> locked(tessera_memory_lock);
        auto found = tessera_allocations.find(memory);
        if (found == tessera_allocations.end()) return CUDA_ERROR_INVALID_VALUE;
        tessera_allocated -= found->second;
        tessera_allocations.erase(found);
    }
    free(memory);
    return CUDA_SUCCESS;
}
CUresult cuMemsetD8_v2(CUdeviceptr at, unsigned char value, size_t n) {
    tessera_fence();
    memset(reinterpret_cast<void*>(at), value, n);
    tessera_note_write(at, n);
    return CUDA_SUCCESS;
}
CUresult cuMemsetD8Async(CUdeviceptr at, unsigned char value, size_t n, CUstream stream) {
    tessera_stream* s;
    if (!tessera_stream_of(stream, &s)) return CUDA_ERROR_INVALID_HANDLE;
    if (s == nullptr) return cuMemsetD8_v2(at, value, n);
    tessera_stream_queue(s, [=] { memset(reinterpret_cast<void*>(at), value, n); });
    return CUDA_SUCCESS;
}
CUresult cuMemcpyHtoD_v2(CUdeviceptr to, const void* from, size_t n) {
    tessera_fence();
    memcpy(reinterpret_cast<void*>(to), from, n);
    tessera_note_write(to, n);
    return CUDA_SUCCESS;
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr to, const void* from, size_t n, CUstream stream) {
    tessera_stream* s;
    if (!tessera_stream_of(stream, &s)) return CUDA_ERROR_INVALID_HANDLE;
    if (s == nullptr) return cuMemcpyHtoD_v2(to, from, n);
    // As from pageable memory on a GPU: the host's bytes are taken now.
    auto bytes = std::make_shared<std::vector<char>>(static_cast<const char*>(from), static_cast<const char*>(from) + n);
    tessera_stream_queue(s, [=] { memcpy(reinterpret_cast<void*>(to), bytes->data(), n); });
    return CUDA_SUCCESS;
}
CUresult cuMemcpyDtoH_v2(void* to, CUdeviceptr from, size_t n) {
    tessera_fence();
    memcpy(to, reinterpret_cast<const void*>(from), n);
    return CUDA_SUCCESS;
}
CUresult cuMemcpyDtoHAsync_v2(void* to, CUdeviceptr from, size_t n, CUstream stream) {
    tessera_stream* s;
    if (!tessera_stream_of(stream, &s)) return CUDA_ERROR_INVALID_HANDLE;
    if (s == nullptr) return cuMemcpyDtoH_v2(to, from, n);
    tessera_stream_queue(s, [=] { memcpy(to, reinterpret_cast<const void*>(from), n); });
    return CUDA_SUCCESS;
}
CUresult cuMemcpyDtoD_v2(CUdeviceptr to, CUdeviceptr from, size_t n) {
    tessera_fence();
    memmove(reinterpret_cast<void*>(to), reinterpret_cast<const void*>(from), n);
    tessera_note_write(to, n);
    return CUDA_SUCCESS;
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr to, CUdeviceptr from, size_t n, CUstream stream) {
    tessera_stream* s;
    if (!tessera_stream_of(stream, &s)) return CUDA_ERROR_INVALID_HANDLE;
    if (s == nullptr) return cuMemcpyDtoD_v2(to, from, n);
    if (tessera_reads_unwaited(s, reinterpret_cast<const void*>(from), n, "a device-to-device copy"))
        return CUDA_ERROR_ILLEGAL_STATE;
    tessera_stream_queue(s, [=] { memmove(reinterpret_cast<void*>(to), reinterpret_cast<const void*>(from), n); });
    return CUDA_SUCCESS;
}
// Copies between two devices' memory (contexts named, as the driver takes them). Counted, so
// that a test can tell a copy between devices from one through the host.
static std::atomic<uint64_t> tessera_peer_copies{0};
static int tessera_context_device(CUcontext context) {
    int d = int(static_cast<int*>(context) - tessera_context_tokens);
    return context != nullptr && tessera_valid(d) ? d : -1;
}
CUresult cuMemcpyPeerAsync(CUdeviceptr to, CUcontext to_context, CUdeviceptr from, CUcontext from_context, size_t n,
                           CUstream stream) {
    if (tessera_context_device(to_context) < 0 || tessera_context_device(from_context) < 0)
        return CUDA_ERROR_INVALID_CONTEXT;
    tessera_peer_copies.fetch_add(1);
    return cuMemcpyDtoDAsync_v2(to, from, n, stream);
}
// How many copies between devices were queued in this process (not a CUDA function).
uint64_t tessera_host_gpu_peer_copies() { return tessera_peer_copies.load(); }

// --- Streams and events (an event is ready once the work queued before it is done) -------

struct tessera_event {
    double time = 0.0;  // when recorded (ms)
    int device = -1;    // recorded behind ticket `ticket` of this device's default stream,
    uint64_t ticket = 0;
    tessera_stream* stream = nullptr;  // or, if set, of this made stream
    uint64_t writes = 0;               // the default stream's writes before it (see tessera_note_write)
};
static bool tessera_event_done(const tessera_event* e) {
    if (e->stream != nullptr) {
        std::lock_guard<std::mutex> locked(e->stream->lock);
        return e->stream->completed >= e->ticket;
    }
    if (e->device < 0 || e->ticket == 0) return true;
    std::lock_guard<std::mutex> locked(tessera_queues[e->device].lock);
    return tessera_queues[e->device].completed >= e->ticket;
}
// When a done event happened: when recorded, or when the work before it finished.
static double tessera_event_time(const tessera_event* e) {
    if (e->ticket == 0) return e->time;
    auto when = [e](const std::vector<double>& at) {
        return e->ticket < at.size() && at[e->ticket] > e->time ? at[e->ticket] : e->time;
    };
    if (e->stream != nullptr) {
        std::lock_guard<std::mutex> locked(e->stream->lock);
        return when(e->stream->completed_at);
    }
    if (e->device < 0) return e->time;
    std::lock_guard<std::mutex> locked(tessera_queues[e->device].lock);
    return when(tessera_queues[e->device].completed_at);
}

CUresult cuStreamSynchronize(CUstream stream) {
    tessera_stream* s;
    if (!tessera_stream_of(stream, &s)) return CUDA_ERROR_INVALID_HANDLE;
    if (s == nullptr) {
        tessera_fence();
    } else {
        uint64_t last;
        {
            std::lock_guard<std::mutex> locked(s->lock);
            last = s->queued;
        }
        tessera_stream_force(s, last);
    }
    return CUDA_SUCCESS;
}
CUresult cuStreamWaitEvent(CUstream stream, CUevent event, unsigned int) {
    tessera_stream* s;
    if (!tessera_stream_of(stream, &s) || event == nullptr) return CUDA_ERROR_INVALID_HANDLE;
    const auto* e = static_cast<tessera_event*>(event);
    if (s == nullptr) {
        // The default stream runs its work when called: what it waits for must be done now.
        // (An event of the default stream itself orders nothing more.)
        if (e->stream != nullptr) tessera_stream_force(e->stream, e->ticket);
        return CUDA_SUCCESS;
    }
    if (e->stream == s) return CUDA_SUCCESS;
    if (e->stream != nullptr) {
        tessera_stream* from = e->stream;
        uint64_t ticket = e->ticket;
        tessera_stream_queue(s, [from, ticket] { tessera_stream_force(from, ticket); });
    } else if (e->device >= 0) {
        int device = e->device;
        uint64_t ticket = e->ticket;
        tessera_stream_queue(s, [device, ticket] { tessera_wait_for(device, ticket); });
        if (device == s->device) {
            std::lock_guard<std::mutex> locked(s->lock);
            if (e->writes > s->writes_waited) s->writes_waited = e->writes;
        }
    }
    return CUDA_SUCCESS;
}
CUresult cuEventCreate(CUevent* event, unsigned int) {
    if (event == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *event = new (std::nothrow) tessera_event();
    return *event == nullptr ? CUDA_ERROR_OUT_OF_MEMORY : CUDA_SUCCESS;
}
CUresult cuEventRecord(CUevent event, CUstream stream) {
    tessera_stream* s;
    if (event == nullptr || !tessera_stream_of(stream, &s)) return CUDA_ERROR_INVALID_HANDLE;
    auto* e = static_cast<tessera_event*>(event);
    e->time = tessera_now_ms();
    e->stream = s;
    e->ticket = 0;
    e->writes = 0;
    if (s != nullptr) {
        e->device = s->device;
        std::lock_guard<std::mutex> locked(s->lock);
        e->ticket = s->queued;
        return CUDA_SUCCESS;
    }
    e->device = tessera_current_device();
    if (e->device >= 0) {
        std::lock_guard<std::mutex> locked(tessera_queues[e->device].lock);
        e->ticket = tessera_queues[e->device].queued;
        e->writes = tessera_queues[e->device].writes;
    }
    return CUDA_SUCCESS;
}
CUresult cuEventSynchronize(CUevent event) {
    if (event == nullptr) return CUDA_ERROR_INVALID_HANDLE;
    auto* e = static_cast<tessera_event*>(event);
    if (e->stream != nullptr) {
        tessera_stream_force(e->stream, e->ticket);
    } else if (e->device >= 0) {
        tessera_wait_for(e->device, e->ticket);
    }
    return CUDA_SUCCESS;
}
CUresult cuEventQuery(CUevent event) {
    if (event == nullptr) return CUDA_ERROR_INVALID_HANDLE;
    return tessera_event_done(static_cast<tessera_event*>(event)) ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY;
}
CUresult cuEventElapsedTime(float* ms, CUevent start, CUevent end) {
    if (ms == nullptr) return CUDA_ERROR_INVALID_VALUE;
    if (start == nullptr || end == nullptr) return CUDA_ERROR_INVALID_HANDLE;
    auto *from = static_cast<tessera_event*>(start), *to = static_cast<tessera_event*>(end);
    if (!tessera_event_done(from) || !tessera_event_done(to)) return CUDA_ERROR_NOT_READY;
    *ms = float(tessera_event_time(to) - tessera_event_time(from));
    return CUDA_SUCCESS;
}
CUresult cuEventDestroy_v2(CUevent event) {
    delete static_cast<tessera_event*>(event);
    return CUDA_SUCCESS;
}

// --- Modules and launches: a module is the kernel table, whatever its code -----------------

CUresult cuModuleLoadData(CUmodule* module, const void* image) {
    if (module == nullptr || image == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *module = const_cast<tessera_kernel*>(tessera_kernels);
    return CUDA_SUCCESS;
}
CUresult cuModuleUnload(CUmodule) { return CUDA_SUCCESS; }
CUresult cuModuleGetFunction(CUfunction* function, CUmodule, const char* name) {
    if (function == nullptr || name == nullptr) return CUDA_ERROR_INVALID_VALUE;
    for (size_t k = 0; k < tessera_kernel_count; ++k) {
        if (strcmp(tessera_kernels[k].name, name) == 0) {
            *function = &tessera_kernels[k];
            return CUDA_SUCCESS;
        }
    }
    return CUDA_ERROR_NOT_FOUND;
}
CUresult cuLaunchKernel(CUfunction function, unsigned int gx, unsigned int gy, unsigned int gz, unsigned int bx,
                        unsigned int by, unsigned int bz, unsigned int shared, CUstream stream, void** params,
                        void** extra) {
    tessera_stream* s;
    if (function == nullptr || !tessera_stream_of(stream, &s)) return CUDA_ERROR_INVALID_HANDLE;
    // Tessera's launches are one-dimensional, with static shared memory only.
    if (gy != 1 || gz != 1 || by != 1 || bz != 1 || shared != 0 || extra != nullptr || gx == 0 || bx == 0)
        return CUDA_ERROR_INVALID_VALUE;
    if (bx > 1024 || gx > 2147483647u) return CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES;
    if (s != nullptr) {
        // The arguments' values are taken now, as the driver does.
        auto values = std::make_shared<std::vector<std::vector<char>>>();
        for (size_t i = 0; i < function->params; ++i) {
            const char* value = static_cast<const char*>(params[i]);
            values->emplace_back(value, value + function->sizes[i]);
        }
        tessera_stream_queue(s, [function, gx, bx, values] {
            std::vector<void*> args;
            for (auto& value : *values) args.push_back(value.data());
            tessera_launch(*function, gx, bx, args.data());
        });
        return CUDA_SUCCESS;
    }
    tessera_fence();
    tessera_launch(*function, gx, bx, params);
    return CUDA_SUCCESS;
}

// --- cuBLAS: column-major products ---------------------------------------------------------

typedef int cublasStatus_t;
typedef void* cublasHandle_t;
enum : cublasStatus_t { CUBLAS_STATUS_SUCCESS = 0, CUBLAS_STATUS_NOT_INITIALIZED = 1, CUBLAS_STATUS_INVALID_VALUE = 7 };
static int tessera_blas_token;

cublasStatus_t cublasCreate_v2(cublasHandle_t* handle) {
    if (handle == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
    *handle = &tessera_blas_token;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasDestroy_v2(cublasHandle_t) { return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasSetStream_v2(cublasHandle_t, CUstream) { return CUBLAS_STATUS_SUCCESS; }
const char* cublasGetStatusString(cublasStatus_t status) {
    switch (status) {
    case CUBLAS_STATUS_SUCCESS: return "success";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "the library was not initialized";
    case CUBLAS_STATUS_INVALID_VALUE: return "an invalid numeric value was used as an argument";
    default: return "unknown cuBLAS status";
    }
}
const char* cublasGetStatusName(cublasStatus_t status) {
    switch (status) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    default: return "CUBLAS_STATUS_UNKNOWN";
    }
}

// C = alpha op(A) op(B) + beta C, column-major, op = none (0) or transpose (1, 2).
static cublasStatus_t tessera_sgemm(int ta, int tb, int m, int n, int k, float alpha, const float* a, int lda,
                                    const float* b, int ldb, float beta, float* c, int ldc) {
    if (m < 0 || n < 0 || k < 0 || ta < 0 || ta > 2 || tb < 0 || tb > 2) return CUBLAS_STATUS_INVALID_VALUE;
    if (ldc < (m > 1 ? m : 1) || lda < ((ta ? k : m) > 1 ? (ta ? k : m) : 1) || ldb < ((tb ? n : k) > 1 ? (tb ? n : k) : 1))
        return CUBLAS_STATUS_INVALID_VALUE;
    for (int j = 0; j < n; ++j) {
        for (int i = 0; i < m; ++i) {
            double sum = 0.0;
            for (int p = 0; p < k; ++p) {
                float x = ta ? a[p + size_t(i) * lda] : a[i + size_t(p) * lda];
                float y = tb ? b[j + size_t(p) * ldb] : b[p + size_t(j) * ldb];
                sum += double(x) * double(y);
            }
            float* out = &c[i + size_t(j) * ldc];
            // beta == 0 ignores what C held (it may be garbage), as cuBLAS does.
            *out = beta == 0.0f ? float(alpha * sum) : float(alpha * sum + double(beta) * *out);
        }
    }
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSgemm_v2(cublasHandle_t handle, int ta, int tb, int m, int n, int k, const float* alpha,
                              const float* a, int lda, const float* b, int ldb, const float* beta, float* c, int ldc) {
    tessera_fence();
    if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (alpha == nullptr || beta == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
    return tessera_sgemm(ta, tb, m, n, k, *alpha, a, lda, b, ldb, *beta, c, ldc);
}

cublasStatus_t cublasSgemmStridedBatched(cublasHandle_t handle, int ta, int tb, int m, int n, int k,
                                         const float* alpha, const float* a, int lda, long long stride_a,
                                         const float* b, int ldb, long long stride_b, const float* beta, float* c,
                                         int ldc, long long stride_c, int batch) {
    tessera_fence();
    if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (alpha == nullptr || beta == nullptr || batch < 0) return CUBLAS_STATUS_INVALID_VALUE;
    for (int i = 0; i < batch; ++i) {
        cublasStatus_t status = tessera_sgemm(ta, tb, m, n, k, *alpha, a + i * stride_a, lda, b + i * stride_b, ldb,
                                              *beta, c + i * stride_c, ldc);
        if (status != CUBLAS_STATUS_SUCCESS) return status;
    }
    return CUBLAS_STATUS_SUCCESS;
}

// --- cuBLASLt: bf16 products with f32 accumulation (no epilogue, no batches) ----------------

typedef void* cublasLtHandle_t;
struct tessera_lt_layout { int type; uint64_t rows, cols; int64_t ld; };
struct tessera_lt_desc { int compute, scale; int trans[3]; int epilogue; };
typedef struct { uint64_t data[8]; } cublasLtMatmulAlgo_t;
typedef struct {
    cublasLtMatmulAlgo_t algo;
    size_t workspaceSize;
    cublasStatus_t state;
    float wavesCount;
    int reserved[4];
} cublasLtMatmulHeuristicResult_t;
enum : cublasStatus_t { CUBLAS_STATUS_NOT_SUPPORTED = 15 };
enum { TESSERA_R_32F = 0, TESSERA_R_16BF = 14, TESSERA_COMPUTE_32F = 68, TESSERA_EPILOGUE_DEFAULT = 1 };
static int tessera_lt_token, tessera_pref_token;

static float tessera_from_bf16(uint16_t bits) {
    uint32_t wide = uint32_t(bits) << 16;
    float value;
    memcpy(&value, &wide, sizeof value);
    return value;
}
static uint16_t tessera_to_bf16(float value) {  // round to nearest, ties to even
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu) != 0) return uint16_t((bits >> 16) | 0x40);
    return uint16_t((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

cublasStatus_t cublasLtCreate(cublasLtHandle_t* handle) {
    if (handle == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
    *handle = &tessera_lt_token;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtDestroy(cublasLtHandle_t) { return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasLtMatrixLayoutCreate(tessera_lt_layout** layout, int type, uint64_t rows, uint64_t cols,
                                          int64_t ld) {
    if (layout == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
    *layout = new tessera_lt_layout{type, rows, cols, ld};
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatrixLayoutDestroy(tessera_lt_layout* layout) {
    delete layout;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulDescCreate(tessera_lt_desc** desc, int compute, int scale) {
    if (desc == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
    *desc = new tessera_lt_desc{compute, scale, {0, 0, 0}, TESSERA_EPILOGUE_DEFAULT};
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulDescDestroy(tessera_lt_desc* desc) {
    delete desc;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulDescSetAttribute(tessera_lt_desc* desc, int attribute, const void* value, size_t size) {
    if (desc == nullptr || value == nullptr || size != sizeof(int)) return CUBLAS_STATUS_INVALID_VALUE;
    int v;
    memcpy(&v, value, sizeof v);
    switch (attribute) {
    case 3: case 4: case 5: desc->trans[attribute - 3] = v; return CUBLAS_STATUS_SUCCESS;  // TRANSA/B/C
    case 7: desc->epilogue = v; return CUBLAS_STATUS_SUCCESS;                              // EPILOGUE
    default: return CUBLAS_STATUS_NOT_SUPPORTED;
    }
}
cublasStatus_t cublasLtMatmulPreferenceCreate(void** pref) {
    if (pref == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
    *pref = &tessera_pref_token;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulPreferenceDestroy(void*) { return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasLtMatmulPreferenceSetAttribute(void*, int, const void*, size_t) { return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t, tessera_lt_desc* desc, tessera_lt_layout*,
                                              tessera_lt_layout*, tessera_lt_layout*, tessera_lt_layout*, void*,
                                              int requested, cublasLtMatmulHeuristicResult_t* results, int* count) {
    if (desc == nullptr || results == nullptr || count == nullptr || requested < 1) return CUBLAS_STATUS_INVALID_VALUE;
    memset(results, 0, sizeof *results);
    *count = 1;
    return CUBLAS_STATUS_SUCCESS;
}
// D = alpha op(A) op(B) + beta C, column-major, bf16 matrices, f32 accumulation and scale.
cublasStatus_t cublasLtMatmul(cublasLtHandle_t handle, tessera_lt_desc* desc, const void* alpha, const void* a,
                              tessera_lt_layout* la, const void* b, tessera_lt_layout* lb, const void* beta,
                              const void* c, tessera_lt_layout* lc, void* d, tessera_lt_layout* ld, const void*, void*,
                              size_t, CUstream) {
    tessera_fence();
    if (handle == nullptr || desc == nullptr || la == nullptr || lb == nullptr || lc == nullptr || ld == nullptr)
        return CUBLAS_STATUS_INVALID_VALUE;
    if (desc->compute != TESSERA_COMPUTE_32F || desc->scale != TESSERA_R_32F || desc->epilogue != TESSERA_EPILOGUE_DEFAULT
        || desc->trans[2] != 0 || la->type != TESSERA_R_16BF || lb->type != TESSERA_R_16BF
        || lc->type != TESSERA_R_16BF || ld->type != TESSERA_R_16BF)
        return CUBLAS_STATUS_NOT_SUPPORTED;
    bool ta = desc->trans[0] != 0, tb = desc->trans[1] != 0;
    uint64_t m = ld->rows, n = ld->cols, k = ta ? la->rows : la->cols;
    if ((ta ? la->cols : la->rows) != m || (tb ? lb->rows : lb->cols) != n || (tb ? lb->cols : lb->rows) != k
        || lc->rows != m || lc->cols != n)
        return CUBLAS_STATUS_INVALID_VALUE;
    float al, be;
    memcpy(&al, alpha, sizeof al);
    memcpy(&be, beta, sizeof be);
    const uint16_t *A = static_cast<const uint16_t*>(a), *B = static_cast<const uint16_t*>(b);
    const uint16_t* C = static_cast<const uint16_t*>(c);
    uint16_t* D = static_cast<uint16_t*>(d);
    for (uint64_t j = 0; j < n; ++j) {
        for (uint64_t i = 0; i < m; ++i) {
            float sum = 0.0f;
            for (uint64_t p = 0; p < k; ++p) {
                float x = tessera_from_bf16(ta ? A[p + i * la->ld] : A[i + p * la->ld]);
                float y = tessera_from_bf16(tb ? B[j + p * lb->ld] : B[p + j * lb->ld]);
                sum += x * y;
            }
            float out = al * sum;
            if (be != 0.0f) out += be * tessera_from_bf16(C[i + j * lc->ld]);
            D[i + j * ld->ld] = tessera_to_bf16(out);
        }
    }
    return CUBLAS_STATUS_SUCCESS;
}

// --- cuSPARSE: CSR (32-bit indices, base 0, f32) times a vector or a dense matrix ----------

typedef int cusparseStatus_t;
enum : cusparseStatus_t { CUSPARSE_STATUS_SUCCESS = 0, CUSPARSE_STATUS_INVALID_VALUE = 3, CUSPARSE_STATUS_NOT_SUPPORTED = 10 };
enum { TESSERA_INDEX_32I = 2, TESSERA_ORDER_COL = 1, TESSERA_ORDER_ROW = 2 };
struct tessera_csr { int64_t rows, cols, nnz; const int32_t* offsets; const int32_t* columns; const float* values; };
struct tessera_dn_vec { int64_t size; float* values; };
struct tessera_dn_mat { int64_t rows, cols, ld; float* values; int order; };
static int tessera_sparse_token;
// What a product asks for as work space: not needed here, but asked for and passed as the
// real library's would be, so that the callers' work buffers are exercised.
static const size_t TESSERA_SPARSE_WORK = 4096;

cusparseStatus_t cusparseCreate(void** handle) {
    if (handle == nullptr) return CUSPARSE_STATUS_INVALID_VALUE;
    *handle = &tessera_sparse_token;
    return CUSPARSE_STATUS_SUCCESS;
}
cusparseStatus_t cusparseDestroy(void*) { return CUSPARSE_STATUS_SUCCESS; }
cusparseStatus_t cusparseSetStream(void*, CUstream) { return CUSPARSE_STATUS_SUCCESS; }
const char* cusparseGetErrorString(cusparseStatus_t status) {
    switch (status) {
    case CUSPARSE_STATUS_SUCCESS: return "success";
    case CUSPARSE_STATUS_INVALID_VALUE: return "invalid value";
    case CUSPARSE_STATUS_NOT_SUPPORTED: return "operation not supported";
    default: return "unknown cuSPARSE status";
    }
}
const char* cusparseGetErrorName(cusparseStatus_t status) {
    switch (status) {
    case CUSPARSE_STATUS_SUCCESS: return "CUSPARSE_STATUS_SUCCESS";
    case CUSPARSE_STATUS_INVALID_VALUE: return "CUSPARSE_STATUS_INVALID_VALUE";
    case CUSPARSE_STATUS_NOT_SUPPORTED: return "CUSPARSE_STATUS_NOT_SUPPORTED";
    default: return "CUSPARSE_STATUS_UNKNOWN";
    }
}
cusparseStatus_t cusparseCreateCsr(tessera_csr** matrix, int64_t rows, int64_t cols, int64_t nnz, void* offsets,
                                   void* columns, void* values, int offset_type, int column_type, int base, int type) {
    if (matrix == nullptr || rows < 0 || cols < 0 || nnz < 0) return CUSPARSE_STATUS_INVALID_VALUE;
    if (offset_type != TESSERA_INDEX_32I || column_type != TESSERA_INDEX_32I || base != 0 || type != TESSERA_R_32F)
        return CUSPARSE_STATUS_NOT_SUPPORTED;
    *matrix = new tessera_csr{rows, cols, nnz, static_cast<const int32_t*>(offsets), static_cast<const int32_t*>(columns),
                              static_cast<const float*>(values)};
    return CUSPARSE_STATUS_SUCCESS;
}
cusparseStatus_t cusparseCreateDnVec(tessera_dn_vec** vector, int64_t size, void* values, int type) {
    if (vector == nullptr || size < 0) return CUSPARSE_STATUS_INVALID_VALUE;
    if (type != TESSERA_R_32F) return CUSPARSE_STATUS_NOT_SUPPORTED;
    *vector = new tessera_dn_vec{size, static_cast<float*>(values)};
    return CUSPARSE_STATUS_SUCCESS;
}
cusparseStatus_t cusparseCreateDnMat(tessera_dn_mat** matrix, int64_t rows, int64_t cols, int64_t ld, void* values,
                                     int type, int order) {
    if (matrix == nullptr || rows < 0 || cols < 0) return CUSPARSE_STATUS_INVALID_VALUE;
    if (type != TESSERA_R_32F || (order != TESSERA_ORDER_ROW && order != TESSERA_ORDER_COL))
        return CUSPARSE_STATUS_NOT_SUPPORTED;
    if (ld < (order == TESSERA_ORDER_ROW ? cols : rows)) return CUSPARSE_STATUS_INVALID_VALUE;
    *matrix = new tessera_dn_mat{rows, cols, ld, static_cast<float*>(values), order};
    return CUSPARSE_STATUS_SUCCESS;
}
cusparseStatus_t cusparseDestroySpMat(tessera_csr* matrix) {
    delete matrix;
    return CUSPARSE_STATUS_SUCCESS;
}
cusparseStatus_t cusparseDestroyDnVec(tessera_dn_vec* vector) {
    delete vector;
    return CUSPARSE_STATUS_SUCCESS;
}
cusparseStatus_t cusparseDestroyDnMat(tessera_dn_mat* matrix) {
    delete matrix;
    return CUSPARSE_STATUS_SUCCESS;
}
cusparseStatus_t cusparseSpMV_bufferSize(void* handle, int op, const void* alpha, tessera_csr* a, tessera_dn_vec* x,
                                         const void* beta, tessera_dn_vec* y, int type, int, size_t* size) {
    if (handle == nullptr || alpha == nullptr || beta == nullptr || a == nullptr || x == nullptr || y == nullptr
        || size == nullptr)
        return CUSPARSE_STATUS_INVALID_VALUE;
    if (op != 0 || type != TESSERA_R_32F) return CUSPARSE_STATUS_NOT_SUPPORTED;
    *size = TESSERA_SPARSE_WORK;
    return CUSPARSE_STATUS_SUCCESS;
}
// y = alpha A x + beta y.
cusparseStatus_t cusparseSpMV(void* handle, int op, const void* alpha, tessera_csr* a, tessera_dn_vec* x,
                              const void* beta, tessera_dn_vec* y, int type, int, void* work) {
    tessera_fence();
    if (handle == nullptr || alpha == nullptr || beta == nullptr || a == nullptr || x == nullptr || y == nullptr)
        return CUSPARSE_STATUS_INVALID_VALUE;
    if (op != 0 || type != TESSERA_R_32F) return CUSPARSE_STATUS_NOT_SUPPORTED;
    if (x->size != a->cols || y->size != a->rows || work == nullptr) return CUSPARSE_STATUS_INVALID_VALUE;
    float al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);
    for (int64_t r = 0; r < a->rows; ++r) {
        float sum = 0.0f;
        for (int32_t e = a->offsets[r]; e < a->offsets[r + 1]; ++e) sum += a->values[e] * x->values[a->columns[e]];
        y->values[r] = be == 0.0f ? al * sum : al * sum + be * y->values[r];
    }
    return CUSPARSE_STATUS_SUCCESS;
}
cusparseStatus_t cusparseSpMM_bufferSize(void* handle, int op_a, int op_b, const void* alpha, tessera_csr* a,
                                         tessera_dn_mat* b, const void* beta, tessera_dn_mat* c, int type, int,
                                         size_t* size) {
    if (handle == nullptr || alpha == nullptr || beta == nullptr || a == nullptr || b == nullptr || c == nullptr
        || size == nullptr)
        return CUSPARSE_STATUS_INVALID_VALUE;
    if (op_a != 0 || op_b != 0 || type != TESSERA_R_32F) return CUSPARSE_STATUS_NOT_SUPPORTED;
    *size = TESSERA_SPARSE_WORK;
    return CUSPARSE_STATUS_SUCCESS;
}
static float& tessera_at(tessera_dn_mat* m, int64_t r, int64_t c) {
    return m->order == TESSERA_ORDER_ROW ? m->values[r * m->ld + c] : m->values[c * m->ld + r];
}
// C = alpha A B + beta C.
cusparseStatus_t cusparseSpMM(void* handle, int op_a, int op_b, const void* alpha, tessera_csr* a, tessera_dn_mat* b,
                              const void* beta, tessera_dn_mat* c, int type, int, void* work) {
    tessera_fence();
    if (handle == nullptr || alpha == nullptr || beta == nullptr || a == nullptr || b == nullptr || c == nullptr)
        return CUSPARSE_STATUS_INVALID_VALUE;
    if (op_a != 0 || op_b != 0 || type != TESSERA_R_32F) return CUSPARSE_STATUS_NOT_SUPPORTED;
    if (b->rows != a->cols || c->rows != a->rows || c->cols != b->cols || work == nullptr)
        return CUSPARSE_STATUS_INVALID_VALUE;
    float al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);
    for (int64_t r = 0; r < a->rows; ++r) {
        for (int64_t j = 0; j < b->cols; ++j) {
            float sum = 0.0f;
            for (int32_t e = a->offsets[r]; e < a->offsets[r + 1]; ++e) sum += a->values[e] * tessera_at(b, a->columns[e], j);
            float& out = tessera_at(c, r, j);
            out = be == 0.0f ? al * sum : al * sum + be * out;
        }
    }
    return CUSPARSE_STATUS_SUCCESS;
}

// --- NCCL: ranks in any processes of this machine, through shared memory ------------------
//
// The unique id names a shared memory segment: a barrier and one slot per rank. A
// collective copies each rank's data into its slot, meets at the barrier, computes its
// result from every slot in rank order (so every rank gets the same bits), and meets again
// before the slots are reused. As with NCCL, a rank that never comes leaves the others
// waiting, until they are aborted.
//
// A communicator made non-blocking (`ncclConfig_t::blocking = 0`) runs its work on threads
// of its own, one after another, as NCCL does:
// - its setup and first collective (where NCCL connects the ranks) on the host: the call
//   returns `ncclInProgress`, and `ncclCommGetAsyncError` says when that work is done;
// - later collectives "on the GPU": the call returns `ncclSuccess` at once, and the device's
//   later operations wait for the collective (see `tessera_device_queue`).
// `ncclCommAbort` stops the work (the barrier's waits look at the abort flag every 10 ms).

typedef int ncclResult_t;
typedef struct { char internal[128]; } ncclUniqueId;
enum : ncclResult_t {
    ncclSuccess = 0,
    ncclSystemError = 2,
    ncclInternalError = 3,
    ncclInvalidArgument = 4,
    ncclInvalidUsage = 5,
    ncclRemoteError = 6,
    ncclInProgress = 7,
};
static const size_t TESSERA_NCCL_SLOT = size_t(64) << 20;  // the largest collective, in bytes
static const size_t TESSERA_NCCL_HEADER = 4096;

// The segment's header. A new segment is all zeros: a barrier in its first round.
struct tessera_nccl_shared {
    std::atomic<unsigned> arrived;     // ranks at the barrier in this round
    std::atomic<unsigned> generation;  // rounds completed (a futex word)
};
static_assert(std::atomic<unsigned>::is_always_lock_free, "the barrier's words are shared between processes");

struct tessera_nccl_comm {
    tessera_nccl_shared* shared = nullptr;
    char* slots = nullptr;
    size_t mapped = 0;
    int rank, ranks;
    bool blocking;
    int device;                              // the current device when it was made
    std::string name;                        // the segment's, until it is unlinked
    std::atomic<bool> aborted{false};
    std::atomic<ncclResult_t> state{ncclSuccess};  // ncclInProgress during host work
    std::thread worker;                      // the last work queued (each joins the one before)
    int collectives = 0;
    // Itself, until released: work queued on a made stream holds it too, so that it runs (as
    // a no-op when aborted) on a live communicator however late it comes.
    std::shared_ptr<tessera_nccl_comm> self;

    tessera_nccl_comm(int rank_, int ranks_, bool blocking_, int device_, std::string name_)
        : rank(rank_), ranks(ranks_), blocking(blocking_), device(device_), name(std::move(name_)) {}
    char* slot(int r) const { return slots + size_t(r) * TESSERA_NCCL_SLOT; }

    // Waits until every rank reached the barrier; false if aborted first.
    bool meet() {
        unsigned round = shared->generation.load(std::memory_order_acquire);
        if (shared->arrived.fetch_add(1, std::memory_order_acq_rel) + 1 == unsigned(ranks)) {
            shared->arrived.store(0, std::memory_order_relaxed);
            shared->generation.fetch_add(1, std::memory_order_acq_rel);
            syscall(SYS_futex, reinterpret_cast<unsigned*>(&shared->generation), FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
            return true;
        }
        while (shared->generation.load(std::memory_order_acquire) == round) {
            if (aborted.load(std::memory_order_acquire)) return false;
            struct timespec ten_ms = {0, 10 * 1000 * 1000};
            syscall(SYS_futex, reinterpret_cast<unsigned*>(&shared->generation), FUTEX_WAIT, round, &ten_ms, nullptr, 0);
        }
        return true;
    }

    // Maps the segment and meets the other ranks, which then have it mapped too.
    ncclResult_t set_up() {
        size_t size = TESSERA_NCCL_HEADER + size_t(ranks) * TESSERA_NCCL_SLOT;
        int fd = shm_open(name.c_str(), O_CREAT | O_RDWR, 0600);
        if (fd < 0) return ncclSystemError;
        if (ftruncate(fd, off_t(size)) != 0) {
            close(fd);
            return ncclSystemError;
        }
        void* at = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        close(fd);
        if (at == MAP_FAILED) return ncclSystemError;
        shared = static_cast<tessera_nccl_shared*>(at);
        slots = static_cast<char*>(at) + TESSERA_NCCL_HEADER;
        mapped = size;
        if (!meet()) return ncclRemoteError;
        unlink_name();  // every rank has it mapped: the name can go
        return ncclSuccess;
    }
    void unlink_name() {
        if (!name.empty()) shm_unlink(name.c_str());  // the first rank to get here removes it
        name.clear();
    }

    // Runs `work`: now when blocking; else after the work queued before it, on a thread of
    // its own: as host work (returning ncclInProgress) or, with `on_device`, as the device's
    // queued work (returning ncclSuccess): on `stream` if it is a made stream, else behind
    // the device's other queued work. (A communicator's device work is on one of the two:
    // Tessera's on a made stream, after the first collective.)
    ncclResult_t run(std::function<ncclResult_t()> work, bool on_device, tessera_stream* stream) {
        if (blocking) return work();
        if (state.load() == ncclInProgress) return ncclInvalidUsage;  // host work: one call at a time
        if (state.load() != ncclSuccess) return state.load();         // a failed communicator stays failed
        if (on_device && stream != nullptr) {
            std::shared_ptr<tessera_nccl_comm> keep = self;
            tessera_stream_queue(stream, [this, keep, work] {
                ncclResult_t result = aborted.load() ? ncclRemoteError : work();
                if (result != ncclSuccess && !aborted.load()) state.store(result);
            });
            return ncclSuccess;
        }
        std::thread before = std::move(worker);
        if (on_device && device >= 0) {
            uint64_t ticket = tessera_enqueue(device);
            worker = std::thread([this, work, ticket, before = std::move(before)]() mutable {
                if (before.joinable()) before.join();
                ncclResult_t result = work();
                // A failure not caused by an abort is the communicator's asynchronous error.
                if (result != ncclSuccess && !aborted.load()) state.store(result);
                tessera_finish(device, ticket);
            });
            return ncclSuccess;
        }
        state.store(ncclInProgress);
        worker = std::thread([this, work, before = std::move(before)]() mutable {
            if (before.joinable()) before.join();
            state.store(work());
        });
        return ncclInProgress;
    }
    // A collective on `stream`, reading `bytes` at `send`: on the host the first time (NCCL
    // connects the ranks then), else queued on the device.
    ncclResult_t collective(CUstream stream, const void* send, size_t bytes, const char* what,
                            std::function<ncclResult_t()> work) {
        tessera_stream* made;
        if (!tessera_stream_of(stream, &made)) return ncclInvalidArgument;
        if (made != nullptr && tessera_reads_unwaited(made, send, bytes, what)) return ncclInvalidUsage;
        return run(std::move(work), collectives++ > 0, made);
    }

    // Stops the work in flight (when aborting) or waits for it; frees everything once the
    // work queued on streams is done with it.
    static void release(tessera_nccl_comm* comm, bool abort) {
        if (abort) comm->aborted.store(true, std::memory_order_release);
        if (comm->worker.joinable()) comm->worker.join();
        std::shared_ptr<tessera_nccl_comm> last = std::move(comm->self);
    }
    static void destroy(tessera_nccl_comm* comm) {
        comm->unlink_name();
        if (comm->shared != nullptr) munmap(comm->shared, comm->mapped);
        delete comm;
    }
};
typedef tessera_nccl_comm* ncclComm_t;

// `ncclConfig_t` as NCCL 2.14 defined it; later layouts only add fields after these.
struct tessera_nccl_config {
    size_t size;
    unsigned magic, version;
    int blocking;
};

static size_t tessera_nccl_size(int type) {
    switch (type) {
    case 0: case 1: return 1;          // int8, uint8
    case 2: case 3: case 7: return 4;  // int32, uint32, float32
    case 4: case 5: case 8: return 8;  // int64, uint64, float64
    case 6: case 9: return 2;          // float16, bfloat16
    default: return 0;
    }
}

ncclResult_t ncclGetVersion(int* version) {
    if (version == nullptr) return ncclInvalidArgument;
    *version = 22703;
    return ncclSuccess;
}
ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
    if (id == nullptr) return ncclInvalidArgument;
    static std::atomic<unsigned> made{0};
    memset(id->internal, 0, sizeof id->internal);
    unsigned long long nonce = (unsigned long long)std::chrono::steady_clock::now().time_since_epoch().count();
    snprintf(id->internal, sizeof id->internal, "/tessera-host-nccl-%d-%u-%llx", int(getpid()), made++, nonce);
    return ncclSuccess;
}
const char* ncclGetErrorString(ncclResult_t result) {
    switch (result) {
    case ncclSuccess: return "no error";
    case ncclSystemError: return "unhandled system error (the host GPU's shared memory)";
    case ncclInternalError: return "internal error";
    case ncclInvalidArgument: return "invalid argument";
    case ncclInvalidUsage: return "invalid usage";
    case ncclRemoteError: return "remote process exited or there was a network error (or the communicator was aborted)";
    case ncclInProgress: return "NCCL operation in progress";
    default: return "unknown result code";
    }
}
ncclResult_t ncclCommInitRankConfig(ncclComm_t* comm, int ranks, ncclUniqueId id, int rank, tessera_nccl_config* config) {
    if (comm == nullptr || ranks < 1 || rank < 0 || rank >= ranks || id.internal[0] != '/') return ncclInvalidArgument;
    bool blocking = true;
    if (config != nullptr) {
        if (config->magic != 0xcafebeef || config->version < 21400 || config->size < sizeof(tessera_nccl_config))
            return ncclInvalidArgument;
        blocking = config->blocking != 0;  // NCCL_CONFIG_UNDEF_INT (INT_MIN) is NCCL's default, blocking
    }
    id.internal[sizeof id.internal - 1] = 0;
    auto* made = new tessera_nccl_comm(rank, ranks, blocking, tessera_current_device(), id.internal);
    made->self = std::shared_ptr<tessera_nccl_comm>(made, tessera_nccl_comm::destroy);
    ncclResult_t result = made->run([made] { return made->set_up(); }, false, nullptr);
    if (blocking && result != ncclSuccess) {
        tessera_nccl_comm::release(made, true);
        *comm = nullptr;
        return result;
    }
    *comm = made;
    return result;
}
ncclResult_t ncclCommInitRank(ncclComm_t* comm, int ranks, ncclUniqueId id, int rank) {
    return ncclCommInitRankConfig(comm, ranks, id, rank, nullptr);
}
ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t* error) {
    if (comm == nullptr || error == nullptr) return ncclInvalidArgument;
    *error = comm->state.load();
    return ncclSuccess;
}
ncclResult_t ncclCommDestroy(ncclComm_t comm) {
    if (comm != nullptr) tessera_nccl_comm::release(comm, false);
    return ncclSuccess;
}
ncclResult_t ncclCommAbort(ncclComm_t comm) {
    if (comm != nullptr) tessera_nccl_comm::release(comm, true);
    return ncclSuccess;
}
ncclResult_t ncclCommFinalize(ncclComm_t) { return ncclSuccess; }
ncclResult_t ncclCommCount(ncclComm_t comm, int* count) {
    if (comm == nullptr || count == nullptr) return ncclInvalidArgument;
    *count = comm->ranks;
    return ncclSuccess;
}
ncclResult_t ncclCommUserRank(ncclComm_t comm, int* rank) {
    if (comm == nullptr || rank == nullptr) return ncclInvalidArgument;
    *rank = comm->rank;
    return ncclSuccess;
}
ncclResult_t ncclCommCuDevice(ncclComm_t comm, int* device) {
    if (comm == nullptr || device == nullptr) return ncclInvalidArgument;
    *device = 0;
    return ncclSuccess;
}
ncclResult_t ncclGroupStart() { return ncclSuccess; }
ncclResult_t ncclGroupEnd() { return ncclSuccess; }

// Sums float32 data (any data with one rank, where every reduction is the data itself).
ncclResult_t ncclAllReduce(const void* send, void* receive, size_t count, int type, int op, ncclComm_t comm,
                           CUstream stream) {
    size_t size = tessera_nccl_size(type), bytes = count * size;
    if (comm == nullptr || size == 0 || bytes > TESSERA_NCCL_SLOT) return ncclInvalidArgument;
    if (comm->ranks > 1 && (type != 7 || op != 0)) return ncclInvalidArgument;  // float32 sum only
    return comm->collective(stream, send, bytes, "ncclAllReduce", [=] {
        if (comm->ranks == 1) {
            if (send != receive) memmove(receive, send, bytes);
            return ncclSuccess;
        }
        memcpy(comm->slot(comm->rank), send, bytes);
        if (!comm->meet()) return ncclRemoteError;
        float* out = static_cast<float*>(receive);
        for (size_t i = 0; i < count; ++i) {
            float sum = 0.0f;
            for (int r = 0; r < comm->ranks; ++r) sum += reinterpret_cast<const float*>(comm->slot(r))[i];
            out[i] = sum;
        }
        return comm->meet() ? ncclSuccess : ncclRemoteError;
    });
}
ncclResult_t ncclBroadcast(const void* send, void* receive, size_t count, int type, int root, ncclComm_t comm,
                           CUstream stream) {
    size_t size = tessera_nccl_size(type), bytes = count * size;
    if (comm == nullptr || size == 0 || root < 0 || root >= comm->ranks || bytes > TESSERA_NCCL_SLOT)
        return ncclInvalidArgument;
    return comm->collective(stream, send, bytes, "ncclBroadcast", [=] {
        if (comm->rank == root) memcpy(comm->slot(0), send, bytes);
        if (!comm->meet()) return ncclRemoteError;
        memmove(receive, comm->slot(0), bytes);
        return comm->meet() ? ncclSuccess : ncclRemoteError;
    });
}
ncclResult_t ncclAllGather(const void* send, void* receive, size_t count, int type, ncclComm_t comm,
                           CUstream stream) {
    size_t size = tessera_nccl_size(type), bytes = count * size;
    if (comm == nullptr || size == 0 || bytes > TESSERA_NCCL_SLOT) return ncclInvalidArgument;
    return comm->collective(stream, send, bytes, "ncclAllGather", [=] {
        memcpy(comm->slot(comm->rank), send, bytes);
        if (!comm->meet()) return ncclRemoteError;
        for (int r = 0; r < comm->ranks; ++r)
            memcpy(static_cast<char*>(receive) + size_t(r) * bytes, comm->slot(r), bytes);
        return comm->meet() ? ncclSuccess : ncclRemoteError;
    });
}

}  // extern "C"
