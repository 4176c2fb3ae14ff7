/* A stand-in for the CUDA driver library (libcuda.so), for tests/fake_driver.rs: fault
 * injection for what Tessera does when a driver is installed but its GPU cannot be used.
 * It exports only the driver functions Tessera's discovery and `Gpu::open` reach before
 * they fail; the error codes are the driver API's (`CUresult` in cuda.h; a code outside
 * it would be undefined behaviour in cudarc's enum), the messages are in the driver's
 * words. TESSERA_FAKE_CUDA picks the machine:
 *   no_device        cuInit fails: CUDA_ERROR_NO_DEVICE (a container without the devices)
 *   driver_mismatch  cuInit fails: CUDA_ERROR_SYSTEM_DRIVER_MISMATCH (the kernel module and
 *                    libcuda are of different versions, as after an upgrade without reboot)
 *   zero             cuInit succeeds, no device
 *   busy             TESSERA_FAKE_CUDA_DEVICES devices (default 1), "Fake GPU" of 80 GiB,
 *                    whose contexts cannot be made: device 0 is held by another process
 *                    (CUDA_ERROR_DEVICE_UNAVAILABLE), the others are out of memory
 *                    (CUDA_ERROR_OUT_OF_MEMORY), so an error tells which device it was
 */
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult;
typedef int CUdevice;
typedef void *CUcontext;

enum {
    SUCCESS = 0,
    INVALID_VALUE = 1,
    OUT_OF_MEMORY = 2,
    DEVICE_UNAVAILABLE = 46,
    NO_DEVICE = 100,
    INVALID_DEVICE = 101,
    SYSTEM_DRIVER_MISMATCH = 803,
};

static int mode_is(const char *name) {
    const char *mode = getenv("TESSERA_FAKE_CUDA");
    return mode != NULL && strcmp(mode, name) == 0;
}

CUresult cuInit(unsigned int flags) {
    (void)flags;
    if (mode_is("no_device")) return NO_DEVICE;
    if (mode_is("driver_mismatch")) return SYSTEM_DRIVER_MISMATCH;
    return SUCCESS;
}

CUresult cuDeviceGetCount(int *count) {
    if (count == NULL) return INVALID_VALUE;
    const char *devices = getenv("TESSERA_FAKE_CUDA_DEVICES");
    *count = mode_is("busy") ? (devices != NULL ? atoi(devices) : 1) : 0;
    return SUCCESS;
}

CUresult cuDeviceGet(CUdevice *device, int ordinal) {
    int count = 0;
    cuDeviceGetCount(&count);
    if (device == NULL) return INVALID_VALUE;
    if (ordinal < 0 || ordinal >= count) return INVALID_DEVICE;
    *device = ordinal;
    return SUCCESS;
}

CUresult cuDeviceGetName(char *name, int len, CUdevice device) {
    (void)device;
    if (name == NULL || len <= 0) return INVALID_VALUE;
    strncpy(name, "Fake GPU", (size_t)len);
    name[len - 1] = '\0';
    return SUCCESS;
}

CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice device) {
    (void)device;
    if (bytes == NULL) return INVALID_VALUE;
    *bytes = (size_t)80 << 30;
    return SUCCESS;
}

CUresult cuDevicePrimaryCtxRetain(CUcontext *context, CUdevice device) {
    (void)context;
    return device == 0 ? DEVICE_UNAVAILABLE : OUT_OF_MEMORY;
}

static const char *text_of(CUresult error, int name) {
    switch (error) {
    case SUCCESS: return name ? "CUDA_SUCCESS" : "no error";
    case INVALID_VALUE: return name ? "CUDA_ERROR_INVALID_VALUE" : "invalid argument";
    case OUT_OF_MEMORY: return name ? "CUDA_ERROR_OUT_OF_MEMORY" : "out of memory";
    case SYSTEM_DRIVER_MISMATCH:
        return name ? "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH"
                    : "system has unsupported display driver / cuda driver combination";
    case DEVICE_UNAVAILABLE:
        return name ? "CUDA_ERROR_DEVICE_UNAVAILABLE" : "CUDA-capable device(s) is/are busy or unavailable";
    case NO_DEVICE: return name ? "CUDA_ERROR_NO_DEVICE" : "no CUDA-capable device is detected";
    case INVALID_DEVICE: return name ? "CUDA_ERROR_INVALID_DEVICE" : "invalid device ordinal";
    default: return NULL;
    }
}

CUresult cuGetErrorName(CUresult error, const char **out) {
    if (out == NULL || (*out = text_of(error, 1)) == NULL) return INVALID_VALUE;
    return SUCCESS;
}

CUresult cuGetErrorString(CUresult error, const char **out) {
    if (out == NULL || (*out = text_of(error, 0)) == NULL) return INVALID_VALUE;
    return SUCCESS;
}
