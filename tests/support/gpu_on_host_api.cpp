// The host GPU's library side (see tests/support/gpu_on_host.rs): the CUDA driver, cuBLAS
// and NCCL functions Tessera's GPU code reaches, on host memory, for one device. Included
// after the kernels and their table (`tessera_kernels`, `tessera_kernel_count`); the
// library built from it answers to the names libcuda.so, libcublas.so and libnccl.so.
//
// Device memory is host memory (a device pointer is a host address), every operation runs
// when it is called (a stream is always idle, an event completes when recorded), kernels
// run through `tessera_launch`, and matrix products follow cuBLAS's column-major
// definitions. Error codes are the libraries' own. Not here: cuBLASLt, cuSPARSE, more than
// one device or one NCCL rank (those calls fail as missing symbols, naming them).
#include <chrono>
#include <mutex>
#include <new>
#include <unordered_map>

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
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES = 701,
};

static int tessera_context_token;  // the one context's handle points here
static thread_local CUcontext tessera_current = nullptr;
static const size_t TESSERA_MEMORY = size_t(16) << 30;

static const char* tessera_error_text(CUresult error, bool name) {
    switch (error) {
    case CUDA_SUCCESS: return name ? "CUDA_SUCCESS" : "no error";
    case CUDA_ERROR_INVALID_VALUE: return name ? "CUDA_ERROR_INVALID_VALUE" : "invalid argument";
    case CUDA_ERROR_OUT_OF_MEMORY: return name ? "CUDA_ERROR_OUT_OF_MEMORY" : "out of memory";
    case CUDA_ERROR_INVALID_DEVICE: return name ? "CUDA_ERROR_INVALID_DEVICE" : "invalid device ordinal";
    case CUDA_ERROR_INVALID_HANDLE: return name ? "CUDA_ERROR_INVALID_HANDLE" : "invalid resource handle";
    case CUDA_ERROR_NOT_FOUND: return name ? "CUDA_ERROR_NOT_FOUND" : "named symbol not found";
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
    *count = 1;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGet(CUdevice* device, int ordinal) {
    if (device == nullptr) return CUDA_ERROR_INVALID_VALUE;
    if (ordinal != 0) return CUDA_ERROR_INVALID_DEVICE;
    *device = 0;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetName(char* name, int len, CUdevice device) {
    if (name == nullptr || len <= 0 || device != 0) return CUDA_ERROR_INVALID_VALUE;
    strncpy(name, "Tessera host GPU", size_t(len));
    name[len - 1] = '\0';
    return CUDA_SUCCESS;
}
CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice device) {
    if (bytes == nullptr || device != 0) return CUDA_ERROR_INVALID_VALUE;
    *bytes = TESSERA_MEMORY;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetAttribute(int* value, int attribute, CUdevice device) {
    if (value == nullptr || device != 0) return CUDA_ERROR_INVALID_VALUE;
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
    if (context == nullptr || device != 0) return CUDA_ERROR_INVALID_VALUE;
    *context = &tessera_context_token;
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
CUresult cuCtxSynchronize() { return CUDA_SUCCESS; }
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
    memset(reinterpret_cast<void*>(at), value, n);
    return CUDA_SUCCESS;
}
CUresult cuMemsetD8Async(CUdeviceptr at, unsigned char value, size_t n, CUstream) { return cuMemsetD8_v2(at, value, n); }
CUresult cuMemcpyHtoD_v2(CUdeviceptr to, const void* from, size_t n) {
    memcpy(reinterpret_cast<void*>(to), from, n);
    return CUDA_SUCCESS;
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr to, const void* from, size_t n, CUstream) { return cuMemcpyHtoD_v2(to, from, n); }
CUresult cuMemcpyDtoH_v2(void* to, CUdeviceptr from, size_t n) {
    memcpy(to, reinterpret_cast<const void*>(from), n);
    return CUDA_SUCCESS;
}
CUresult cuMemcpyDtoHAsync_v2(void* to, CUdeviceptr from, size_t n, CUstream) { return cuMemcpyDtoH_v2(to, from, n); }
CUresult cuMemcpyDtoD_v2(CUdeviceptr to, CUdeviceptr from, size_t n) {
    memmove(reinterpret_cast<void*>(to), reinterpret_cast<const void*>(from), n);
    return CUDA_SUCCESS;
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr to, CUdeviceptr from, size_t n, CUstream) { return cuMemcpyDtoD_v2(to, from, n); }

// --- Streams and events (work is done when queued; events stamp the time) ----------------

CUresult cuStreamSynchronize(CUstream) { return CUDA_SUCCESS; }
CUresult cuStreamWaitEvent(CUstream, CUevent, unsigned int) { return CUDA_SUCCESS; }
CUresult cuEventCreate(CUevent* event, unsigned int) {
    if (event == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *event = new (std::nothrow) double(0.0);
    return *event == nullptr ? CUDA_ERROR_OUT_OF_MEMORY : CUDA_SUCCESS;
}
CUresult cuEventRecord(CUevent event, CUstream) {
    if (event == nullptr) return CUDA_ERROR_INVALID_HANDLE;
    using clock = std::chrono::steady_clock;
    *static_cast<double*>(event) = std::chrono::duration<double, std::milli>(clock::now().time_since_epoch()).count();
    return CUDA_SUCCESS;
}
CUresult cuEventSynchronize(CUevent event) { return event == nullptr ? CUDA_ERROR_INVALID_HANDLE : CUDA_SUCCESS; }
CUresult cuEventQuery(CUevent event) { return event == nullptr ? CUDA_ERROR_INVALID_HANDLE : CUDA_SUCCESS; }
CUresult cuEventElapsedTime(float* ms, CUevent start, CUevent end) {
    if (ms == nullptr) return CUDA_ERROR_INVALID_VALUE;
    if (start == nullptr || end == nullptr) return CUDA_ERROR_INVALID_HANDLE;
    *ms = float(*static_cast<double*>(end) - *static_cast<double*>(start));
    return CUDA_SUCCESS;
}
CUresult cuEventDestroy_v2(CUevent event) {
    delete static_cast<double*>(event);
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
                        unsigned int by, unsigned int bz, unsigned int shared, CUstream, void** params, void** extra) {
    if (function == nullptr) return CUDA_ERROR_INVALID_HANDLE;
    // Tessera's launches are one-dimensional, with static shared memory only.
    if (gy != 1 || gz != 1 || by != 1 || bz != 1 || shared != 0 || extra != nullptr || gx == 0 || bx == 0)
        return CUDA_ERROR_INVALID_VALUE;
    if (bx > 1024 || gx > 2147483647u) return CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES;
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
    if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (alpha == nullptr || beta == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
    return tessera_sgemm(ta, tb, m, n, k, *alpha, a, lda, b, ldb, *beta, c, ldc);
}

cublasStatus_t cublasSgemmStridedBatched(cublasHandle_t handle, int ta, int tb, int m, int n, int k,
                                         const float* alpha, const float* a, int lda, long long stride_a,
                                         const float* b, int ldb, long long stride_b, const float* beta, float* c,
                                         int ldc, long long stride_c, int batch) {
    if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (alpha == nullptr || beta == nullptr || batch < 0) return CUBLAS_STATUS_INVALID_VALUE;
    for (int i = 0; i < batch; ++i) {
        cublasStatus_t status = tessera_sgemm(ta, tb, m, n, k, *alpha, a + i * stride_a, lda, b + i * stride_b, ldb,
                                              *beta, c + i * stride_c, ldc);
        if (status != CUBLAS_STATUS_SUCCESS) return status;
    }
    return CUBLAS_STATUS_SUCCESS;
}

// --- NCCL: a group of one rank --------------------------------------------------------

typedef int ncclResult_t;
typedef void* ncclComm_t;
typedef struct { char internal[128]; } ncclUniqueId;
enum : ncclResult_t { ncclSuccess = 0, ncclInvalidArgument = 4, ncclInvalidUsage = 5 };
static int tessera_nccl_token;

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
    memset(id->internal, 0, sizeof id->internal);
    strcpy(id->internal, "tessera host GPU");
    return ncclSuccess;
}
const char* ncclGetErrorString(ncclResult_t result) {
    switch (result) {
    case ncclSuccess: return "no error";
    case ncclInvalidArgument: return "invalid argument";
    case ncclInvalidUsage: return "invalid usage (the host GPU holds groups of one rank)";
    default: return "unknown result code";
    }
}
ncclResult_t ncclCommInitRank(ncclComm_t* comm, int ranks, ncclUniqueId, int rank) {
    if (comm == nullptr) return ncclInvalidArgument;
    if (ranks != 1 || rank != 0) return ncclInvalidUsage;
    *comm = &tessera_nccl_token;
    return ncclSuccess;
}
ncclResult_t ncclCommDestroy(ncclComm_t) { return ncclSuccess; }
ncclResult_t ncclCommAbort(ncclComm_t) { return ncclSuccess; }
ncclResult_t ncclCommFinalize(ncclComm_t) { return ncclSuccess; }
ncclResult_t ncclCommCount(ncclComm_t, int* count) {
    if (count == nullptr) return ncclInvalidArgument;
    *count = 1;
    return ncclSuccess;
}
ncclResult_t ncclCommUserRank(ncclComm_t, int* rank) {
    if (rank == nullptr) return ncclInvalidArgument;
    *rank = 0;
    return ncclSuccess;
}
ncclResult_t ncclCommCuDevice(ncclComm_t, int* device) {
    if (device == nullptr) return ncclInvalidArgument;
    *device = 0;
    return ncclSuccess;
}
ncclResult_t ncclGroupStart() { return ncclSuccess; }
ncclResult_t ncclGroupEnd() { return ncclSuccess; }
// With one rank, a sum, product, minimum, maximum or average is the rank's own data.
ncclResult_t ncclAllReduce(const void* send, void* receive, size_t count, int type, int, ncclComm_t comm, CUstream) {
    size_t size = tessera_nccl_size(type);
    if (comm == nullptr || size == 0) return ncclInvalidArgument;
    if (send != receive) memmove(receive, send, count * size);
    return ncclSuccess;
}
ncclResult_t ncclAllGather(const void* send, void* receive, size_t count, int type, ncclComm_t comm, CUstream) {
    size_t size = tessera_nccl_size(type);
    if (comm == nullptr || size == 0) return ncclInvalidArgument;
    if (send != receive) memmove(receive, send, count * size);
    return ncclSuccess;
}
ncclResult_t ncclReduceScatter(const void* send, void* receive, size_t count, int type, int, ncclComm_t comm,
                               CUstream) {
    size_t size = tessera_nccl_size(type);
    if (comm == nullptr || size == 0) return ncclInvalidArgument;
    if (send != receive) memmove(receive, send, count * size);
    return ncclSuccess;
}
ncclResult_t ncclBroadcast(const void* send, void* receive, size_t count, int type, int root, ncclComm_t comm, CUstream) {
    size_t size = tessera_nccl_size(type);
    if (comm == nullptr || size == 0 || root != 0) return ncclInvalidArgument;
    if (send != receive) memmove(receive, send, count * size);
    return ncclSuccess;
}

}  // extern "C"
