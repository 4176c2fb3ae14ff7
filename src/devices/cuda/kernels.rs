//! The CUDA C sources of every NVRTC kernel: the elementwise, reduction and softmax
//! kernels of [`Gpu`](super::Gpu), and the forward, backward and optimizer kernels of the
//! model graph's GPU executor. Each source is compiled with [`KERNEL_PRELUDE`] in front of it.
//!
//! CI compiles every one of them to PTX and to machine code for sm_90 and sm_80
//! (`tests/gpu.rs`, NVRTC from PyPI), so a kernel that does not compile, or does not fit
//! those architectures, fails the build's tests even on a machine without a GPU.
//!
//! Launch shapes: elementwise kernels loop over elements by thread and take any grid
//! ([`grid`](super::grid)); the row kernels (softmax, softmax cross-entropy, softmax
//! gradient, row sums) give each row a block of a power of two up to 256 threads
//! ([`rows_config`](super::rows_config)); `col_sums_add_f32` takes blocks of 256 threads
//! over tiles of 32 columns ([`column_tiles`](super::column_tiles)); `mean_f32` and
//! `mse_f32` one block of 256 ([`one_block`](super::one_block)), the distributed arrays'
//! `darray_reduce_f32` and `darray_reduce_f64` (also `Gpu::sum`) blocks of 256, and
//! `darray_transpose_f32` blocks of 256 over tiles of 32×32. No kernel adds floats with
//! atomics except the fallbacks for ids written on the device (`embedding_grad_add_f32`,
//! `sparse_matmul_add_f32`), so results are the same bits every run.

/// Helpers every kernel may use: the grid-stride loop, block sums, maxima and tiled column
/// sums in shared memory, activations by code (0 identity, 1 ReLU, 2 sigmoid, 3 tanh) and their
/// derivatives from the output, and a counter-based uniform random number (SplitMix64 of
/// seed and index).
pub const KERNEL_PRELUDE: &str = r#"
#define TESSERA_LOOP(i, n) for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += blockDim.x * gridDim.x)
static __device__ __forceinline__ float tessera_act(int act, float x) {
    switch (act) {
    case 1: return x > 0.0f ? x : 0.0f;
    case 2: return 1.0f / (1.0f + expf(-x));
    case 3: return tanhf(x);
    default: return x;
    }
}
static __device__ __forceinline__ float tessera_act_grad(int act, float y, float g) {
    switch (act) {
    case 1: return y > 0.0f ? g : 0.0f;
    case 2: return g * y * (1.0f - y);
    case 3: return g * (1.0f - y * y);
    default: return g;
    }
}
// Block reductions: the sum or maximum of every thread's `v`, returned to every thread of
// the block. `partial` is a `__shared__` array of at least blockDim.x elements, blockDim.x a
// power of two; every thread of the block must call them, the same number of times (they
// synchronise: never inside a loop whose trip count differs between a block's threads),
// and `partial` may be reused as soon as they return.
template <typename T, typename Combine>
static __device__ __forceinline__ T tessera_block_reduce(T* partial, T v, Combine combine) {
    unsigned int t = threadIdx.x;
    partial[t] = v;
    __syncthreads();
    for (unsigned int k = blockDim.x / 2; k > 0; k >>= 1) {
        if (t < k) { partial[t] = combine(partial[t], partial[t + k]); }
        __syncthreads();
    }
    T total = partial[0];
    __syncthreads();
    return total;
}
static __device__ __forceinline__ float tessera_block_sum(float* partial, float v) {
    return tessera_block_reduce(partial, v, [](float a, float b) { return a + b; });
}
static __device__ __forceinline__ double tessera_block_sum_double(double* partial, double v) {
    return tessera_block_reduce(partial, v, [](double a, double b) { return a + b; });
}
static __device__ __forceinline__ float tessera_block_max(float* partial, float v) {
    return tessera_block_reduce(partial, v, [](float a, float b) { return fmaxf(a, b); });
}
// Adds Σ_r value(r, j) into dst[j] for every column j < cols, by blocks of 256 threads
// over tiles of 32 columns (`partial` a __shared__ array of 256): thread t sums column
// tile·32 + t % 32 over rows t / 32, t / 32 + 8, ... (a warp reads 32 adjacent columns of a
// row), then each column's 8 partial sums are added in a fixed order (deterministic).
template <typename Value>
static __device__ __forceinline__ void tessera_block_column_sums(float* partial, unsigned int rows, unsigned int cols,
        float* dst, Value value) {
    unsigned int lane = threadIdx.x % 32, group = threadIdx.x / 32, groups = blockDim.x / 32;
    for (unsigned int tile = blockIdx.x; tile * 32 < cols; tile += gridDim.x) {
        unsigned int j = tile * 32 + lane;
        float s = 0.0f;
        if (j < cols) {
            for (unsigned int r = group; r < rows; r += groups) { s += value(r, j); }
        }
        partial[threadIdx.x] = s;
        __syncthreads();
        if (group == 0 && j < cols) {
            float total = partial[lane];
            for (unsigned int k = 1; k < groups; ++k) { total += partial[k * 32 + lane]; }
            dst[j] += total;
        }
        __syncthreads();
    }
}
// The distributed arrays' reductions by code (0 sum, 1 min, 2 max), in double; a NaN loses
// to a number (as fmin and fmax do, and as the CPU's f32::min and f32::max do).
static __device__ __forceinline__ double tessera_reduce_op(int op, double a, double b) {
    return op == 0 ? a + b : op == 1 ? fmin(a, b) : fmax(a, b);
}
static __device__ __forceinline__ float tessera_uniform(unsigned long long seed, unsigned int i) {
    unsigned long long z = seed + 0x9E3779B97F4A7C15ULL * ((unsigned long long)i + 1ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z = z ^ (z >> 31);
    return (float)(z >> 40) * (1.0f / 16777216.0f);
}
"#;

/// Every kernel: its name (the `extern "C"` entry point) and its CUDA C source.
pub const KERNELS: &[(&str, &str)] = &[
    (
        "relu_f32",
        r#"extern "C" __global__ void relu_f32(float* x, unsigned int n) {
    TESSERA_LOOP(i, n) { if (x[i] < 0.0f) { x[i] = 0.0f; } }
}"#,
    ),
    (
        "axpy_f32",
        r#"extern "C" __global__ void axpy_f32(float a, const float* x, float* y, unsigned int n) {
    TESSERA_LOOP(i, n) { y[i] += a * x[i]; }
}"#,
    ),
    (
        "softmax_rows_f32",
        r#"extern "C" __global__ void softmax_rows_f32(float* x, unsigned int rows, unsigned int cols) {
    __shared__ float partial[256];
    for (unsigned int r = blockIdx.x; r < rows; r += gridDim.x) {
        float* row = x + (size_t)r * cols;
        float m = -__int_as_float(0x7f800000);
        for (unsigned int j = threadIdx.x; j < cols; j += blockDim.x) { m = fmaxf(m, row[j]); }
        m = tessera_block_max(partial, m);
        float s = 0.0f;
        for (unsigned int j = threadIdx.x; j < cols; j += blockDim.x) {
            float e = expf(row[j] - m);
            row[j] = e;
            s += e;
        }
        float inv = 1.0f / tessera_block_sum(partial, s);
        for (unsigned int j = threadIdx.x; j < cols; j += blockDim.x) { row[j] *= inv; }
    }
}"#,
    ),
    (
        "fill_f32",
        r#"extern "C" __global__ void fill_f32(float* x, float value, unsigned int n) {
    TESSERA_LOOP(i, n) { x[i] = value; }
}"#,
    ),
    (
        "bias_act_f32",
        r#"extern "C" __global__ void bias_act_f32(float* y, const float* bias, unsigned int n, unsigned int cols, int act) {
    TESSERA_LOOP(i, n) { y[i] = tessera_act(act, y[i] + bias[i % cols]); }
}"#,
    ),
    (
        "act_f32",
        r#"extern "C" __global__ void act_f32(const float* x, float* y, unsigned int n, int act) {
    TESSERA_LOOP(i, n) { y[i] = tessera_act(act, x[i]); }
}"#,
    ),
    (
        "act_grad_f32",
        r#"extern "C" __global__ void act_grad_f32(const float* y, const float* g, float* dz, unsigned int n, int act) {
    TESSERA_LOOP(i, n) { dz[i] = tessera_act_grad(act, y[i], g[i]); }
}"#,
    ),
    (
        "act_grad_add_f32",
        r#"extern "C" __global__ void act_grad_add_f32(const float* y, const float* g, float* dx, unsigned int n, int act) {
    TESSERA_LOOP(i, n) { dx[i] += tessera_act_grad(act, y[i], g[i]); }
}"#,
    ),
    (
        "add_bcast_f32",
        r#"extern "C" __global__ void add_bcast_f32(const float* a, const float* b, float* y, unsigned int n, unsigned int bn) {
    TESSERA_LOOP(i, n) { y[i] = a[i] + b[i % bn]; }
}"#,
    ),
    (
        "mul_add_f32",
        r#"extern "C" __global__ void mul_add_f32(const float* a, const float* b, float* dst, unsigned int n) {
    TESSERA_LOOP(i, n) { dst[i] += a[i] * b[i]; }
}"#,
    ),
    (
        "col_sums_add_f32",
        r#"extern "C" __global__ void col_sums_add_f32(const float* m, float* dst, unsigned int rows, unsigned int cols) {
    __shared__ float partial[256];
    tessera_block_column_sums(partial, rows, cols, dst, [=](unsigned int r, unsigned int j) {
        return m[(size_t)r * cols + j];
    });
}"#,
    ),
    (
        "row_sums_add_f32",
        r#"extern "C" __global__ void row_sums_add_f32(const float* m, float* dst, unsigned int rows, unsigned int cols) {
    __shared__ float partial[256];
    for (unsigned int row = blockIdx.x; row < rows; row += gridDim.x) {
        float s = 0.0f;
        for (unsigned int j = threadIdx.x; j < cols; j += blockDim.x) { s += m[(size_t)row * cols + j]; }
        s = tessera_block_sum(partial, s);
        if (threadIdx.x == 0) { dst[row] += s; }
    }
}"#,
    ),
    (
        "im2col_f32",
        r#"extern "C" __global__ void im2col_f32(const float* x, float* cols, unsigned int n, unsigned int c,
        unsigned int h, unsigned int w, unsigned int kh, unsigned int kw, unsigned int oh, unsigned int ow,
        unsigned int stride, unsigned int pad) {
    unsigned int ohw = oh * ow, ncols = n * ohw;
    TESSERA_LOOP(idx, c * kh * kw * ncols) {
        unsigned int row = idx / ncols, col = idx % ncols;
        unsigned int b = col / ohw, p = col % ohw, i = p / ow, j = p % ow;
        unsigned int kj = row % kw, ki = (row / kw) % kh, ch = row / (kw * kh);
        int yi = (int)(i * stride + ki) - (int)pad, xj = (int)(j * stride + kj) - (int)pad;
        float v = 0.0f;
        if (yi >= 0 && yi < (int)h && xj >= 0 && xj < (int)w) { v = x[(((size_t)b * c + ch) * h + yi) * w + xj]; }
        cols[idx] = v;
    }
}"#,
    ),
    (
        "col2im_add_f32",
        r#"extern "C" __global__ void col2im_add_f32(const float* cols, float* dx, unsigned int n, unsigned int c,
        unsigned int h, unsigned int w, unsigned int kh, unsigned int kw, unsigned int oh, unsigned int ow,
        unsigned int stride, unsigned int pad) {
    unsigned int ohw = oh * ow, ncols = n * ohw;
    TESSERA_LOOP(idx, n * c * h * w) {
        unsigned int xx = idx % w, yy = (idx / w) % h, ch = (idx / (w * h)) % c, b = idx / (w * h * c);
        float s = 0.0f;
        for (unsigned int ki = 0; ki < kh; ++ki) {
            int ty = (int)(yy + pad) - (int)ki;
            if (ty < 0 || ty % (int)stride != 0) { continue; }
            unsigned int i = (unsigned int)ty / stride;
            if (i >= oh) { continue; }
            for (unsigned int kj = 0; kj < kw; ++kj) {
                int tx = (int)(xx + pad) - (int)kj;
                if (tx < 0 || tx % (int)stride != 0) { continue; }
                unsigned int j = (unsigned int)tx / stride;
                if (j >= ow) { continue; }
                unsigned int row = (ch * kh + ki) * kw + kj;
                s += cols[(size_t)row * ncols + b * ohw + i * ow + j];
            }
        }
        dx[idx] += s;
    }
}"#,
    ),
    (
        "conv_out_f32",
        r#"extern "C" __global__ void conv_out_f32(const float* prod, const float* bias, float* y, unsigned int n,
        unsigned int o, unsigned int ohw, int act) {
    TESSERA_LOOP(idx, n * o * ohw) {
        unsigned int b = idx / (o * ohw), oc = (idx / ohw) % o, p = idx % ohw;
        y[idx] = tessera_act(act, prod[((size_t)oc * n + b) * ohw + p] + bias[oc]);
    }
}"#,
    ),
    (
        "conv_grad_out_f32",
        r#"extern "C" __global__ void conv_grad_out_f32(const float* y, const float* g, float* dz, unsigned int n,
        unsigned int o, unsigned int ohw, int act) {
    TESSERA_LOOP(idx, n * o * ohw) {
        unsigned int b = idx / (o * ohw), oc = (idx / ohw) % o, p = idx % ohw;
        dz[((size_t)oc * n + b) * ohw + p] = tessera_act_grad(act, y[idx], g[idx]);
    }
}"#,
    ),
    (
        "maxpool_f32",
        r#"extern "C" __global__ void maxpool_f32(const float* x, float* y, int* arg, unsigned int planes, unsigned int h,
        unsigned int w, unsigned int oh, unsigned int ow, unsigned int size, unsigned int stride) {
    TESSERA_LOOP(idx, planes * oh * ow) {
        unsigned int plane = idx / (oh * ow), q = idx % (oh * ow), i = q / ow, j = q % ow;
        const float* xp = x + (size_t)plane * h * w;
        unsigned int first = i * stride * w + j * stride;
        float best = xp[first];
        unsigned int at = first;
        for (unsigned int di = 0; di < size; ++di) {
            for (unsigned int dj = 0; dj < size; ++dj) {
                unsigned int k = first + di * w + dj;
                if (xp[k] > best) { best = xp[k]; at = k; }
            }
        }
        y[idx] = best;
        arg[idx] = (int)at;
    }
}"#,
    ),
    (
        "maxpool_grad_add_f32",
        r#"extern "C" __global__ void maxpool_grad_add_f32(const float* g, const int* arg, float* dx, unsigned int planes,
        unsigned int h, unsigned int w, unsigned int oh, unsigned int ow, unsigned int size, unsigned int stride) {
    // One thread per input element gathers the gradients of the windows whose maximum it
    // was, in window order: deterministic, no atomics. Window (i, j) covers rows
    // i·stride ≤ y < i·stride + size, and likewise columns.
    TESSERA_LOOP(idx, planes * h * w) {
        unsigned int plane = idx / (h * w), q = idx % (h * w), y = q / w, x = q % w;
        unsigned int i0 = y >= size ? (y - size) / stride + 1 : 0, j0 = x >= size ? (x - size) / stride + 1 : 0;
        const float* gp = g + (size_t)plane * oh * ow;
        const int* ap = arg + (size_t)plane * oh * ow;
        float s = 0.0f;
        for (unsigned int i = i0; i <= y / stride && i < oh; ++i) {
            for (unsigned int j = j0; j <= x / stride && j < ow; ++j) {
                if (ap[i * ow + j] == (int)q) { s += gp[i * ow + j]; }
            }
        }
        dx[idx] += s;
    }
}"#,
    ),
    (
        "dropout_f32",
        r#"extern "C" __global__ void dropout_f32(const float* x, float* y, float* mask, unsigned int n, float p,
        unsigned long long seed) {
    float keep = 1.0f / (1.0f - p);
    TESSERA_LOOP(i, n) {
        float m = tessera_uniform(seed, i) < p ? 0.0f : keep;
        mask[i] = m;
        y[i] = x[i] * m;
    }
}"#,
    ),
    (
        "softmax_xent_f32",
        r#"extern "C" __global__ void softmax_xent_f32(const float* logits, const int* labels, float* probs,
        float* row_loss, unsigned int rows, unsigned int cols) {
    __shared__ float partial[256];
    for (unsigned int r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* l = logits + (size_t)r * cols;
        float* p = probs + (size_t)r * cols;
        float m = -__int_as_float(0x7f800000);
        for (unsigned int j = threadIdx.x; j < cols; j += blockDim.x) { m = fmaxf(m, l[j]); }
        m = tessera_block_max(partial, m);
        float s = 0.0f;
        for (unsigned int j = threadIdx.x; j < cols; j += blockDim.x) {
            float e = expf(l[j] - m);
            p[j] = e;
            s += e;
        }
        float total = tessera_block_sum(partial, s);
        float inv = 1.0f / total;
        for (unsigned int j = threadIdx.x; j < cols; j += blockDim.x) { p[j] *= inv; }
        __syncthreads();
        if (threadIdx.x == 0) {
            int label = labels[r];
            if (label >= 0 && label < (int)cols) {
                // An underflowed probability: log-sum-exp minus the label's logit, exactly.
                float q = p[label];
                row_loss[r] = q >= 1e-30f ? -logf(q) : m + logf(total) - l[label];
            } else {
                row_loss[r] = __int_as_float(0x7fc00000);
            }
        }
    }
}"#,
    ),
    (
        "mean_f32",
        r#"extern "C" __global__ void mean_f32(const float* x, float* out, unsigned int n) {
    __shared__ double partial[256];
    double s = 0.0;
    for (unsigned int i = threadIdx.x; i < n; i += blockDim.x) { s += (double)x[i]; }
    s = tessera_block_sum_double(partial, s);
    if (threadIdx.x == 0) { out[0] = (float)(s / (double)(n > 0 ? n : 1)); }
}"#,
    ),
    (
        "xent_grad_add_f32",
        r#"extern "C" __global__ void xent_grad_add_f32(const float* probs, const int* labels, const float* g, float* dx,
        unsigned int rows, unsigned int cols) {
    float scale = g[0] / (float)(rows > 0 ? rows : 1);
    TESSERA_LOOP(idx, rows * cols) {
        unsigned int r = idx / cols, j = idx % cols;
        float v = scale * probs[idx];
        if ((int)j == labels[r]) { v -= scale; }
        dx[idx] += v;
    }
}"#,
    ),
    (
        "softmax_grad_add_f32",
        r#"extern "C" __global__ void softmax_grad_add_f32(const float* y, const float* g, float* dx, unsigned int rows,
        unsigned int cols) {
    __shared__ float partial[256];
    for (unsigned int r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* yr = y + (size_t)r * cols;
        const float* gr = g + (size_t)r * cols;
        float s = 0.0f;
        for (unsigned int j = threadIdx.x; j < cols; j += blockDim.x) { s += yr[j] * gr[j]; }
        s = tessera_block_sum(partial, s);
        for (unsigned int j = threadIdx.x; j < cols; j += blockDim.x) { dx[(size_t)r * cols + j] += yr[j] * (gr[j] - s); }
    }
}"#,
    ),
    (
        "sgd_f32",
        r#"extern "C" __global__ void sgd_f32(float* p, float* m, const float* g, unsigned int n, float lr, float momentum,
        float weight_decay) {
    TESSERA_LOOP(i, n) {
        float mi = momentum * m[i] + g[i] + weight_decay * p[i];
        mi = fabsf(mi) < 1e-30f ? 0.0f : mi;
        m[i] = mi;
        p[i] -= lr * mi;
    }
}"#,
    ),
    (
        "adam_f32",
        r#"extern "C" __global__ void adam_f32(float* p, float* m, float* v, const float* g, unsigned int n, float lr,
        float beta1, float beta2, float eps, float l2, float decay, float c1, float c2) {
    TESSERA_LOOP(i, n) {
        float gi = g[i] + l2 * p[i];
        gi = fabsf(gi) < 1e-15f ? 0.0f : gi;
        float mi = beta1 * m[i] + (1.0f - beta1) * gi;
        float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
        mi = fabsf(mi) < 1e-30f ? 0.0f : mi;
        vi = fabsf(vi) < 1e-30f ? 0.0f : vi;
        m[i] = mi;
        v[i] = vi;
        p[i] = p[i] * decay - lr * ((mi * c1) / (sqrtf(vi * c2) + eps));
    }
}"#,
    ),
    (
        "gather_rows_f32",
        r#"extern "C" __global__ void gather_rows_f32(const float* src, const unsigned int* idx, float* dst,
        unsigned int rows, unsigned int dim) {
    TESSERA_LOOP(k, rows * dim) { dst[k] = src[(size_t)idx[k / dim] * dim + k % dim]; }
}"#,
    ),
    (
        "gather_i32",
        r#"extern "C" __global__ void gather_i32(const int* src, const unsigned int* idx, int* dst, unsigned int n) {
    TESSERA_LOOP(k, n) { dst[k] = src[idx[k]]; }
}"#,
    ),
    (
        "count_correct_f32",
        r#"extern "C" __global__ void count_correct_f32(const float* logits, const int* labels, unsigned int rows,
        unsigned int cols, unsigned int* count) {
    TESSERA_LOOP(r, rows) {
        const float* l = logits + (size_t)r * cols;
        unsigned int best = 0;
        for (unsigned int j = 1; j < cols; ++j) { if (l[j] > l[best]) { best = j; } }
        if ((int)best == labels[r]) { atomicAdd(count, 1u); }
    }
}"#,
    ),
    (
        "binary_f32",
        r#"extern "C" __global__ void binary_f32(const float* a, const float* b, float* y, unsigned int n, int op) {
    TESSERA_LOOP(i, n) { y[i] = op == 0 ? a[i] - b[i] : a[i] * b[i]; }
}"#,
    ),
    (
        "gelu_f32",
        r#"extern "C" __global__ void gelu_f32(const float* x, float* y, unsigned int n) {
    TESSERA_LOOP(i, n) {
        float v = x[i];
        y[i] = 0.5f * v * (1.0f + tanhf(0.7978846f * (v + 0.044715f * v * v * v)));
    }
}"#,
    ),
    (
        "gelu_grad_add_f32",
        r#"extern "C" __global__ void gelu_grad_add_f32(const float* x, const float* g, float* dx, unsigned int n) {
    TESSERA_LOOP(i, n) {
        float v = x[i];
        float t = tanhf(0.7978846f * (v + 0.044715f * v * v * v));
        float dt = (1.0f - t * t) * 0.7978846f * (1.0f + 3.0f * 0.044715f * v * v);
        dx[i] += g[i] * (0.5f * (1.0f + t) + 0.5f * v * dt);
    }
}"#,
    ),
    (
        "mse_f32",
        r#"extern "C" __global__ void mse_f32(const float* a, const float* b, float* out, unsigned int n) {
    __shared__ double partial[256];
    double s = 0.0;
    for (unsigned int i = threadIdx.x; i < n; i += blockDim.x) {
        float d = a[i] - b[i];
        s += (double)(d * d);
    }
    s = tessera_block_sum_double(partial, s);
    if (threadIdx.x == 0) { out[0] = (float)(s / (double)(n > 0 ? n : 1)); }
}"#,
    ),
    (
        "mse_grad_add_f32",
        r#"extern "C" __global__ void mse_grad_add_f32(const float* a, const float* b, const float* g, float* dx,
        unsigned int n, float sign) {
    float scale = sign * 2.0f * g[0] / (float)(n > 0 ? n : 1);
    TESSERA_LOOP(i, n) { dx[i] += scale * (a[i] - b[i]); }
}"#,
    ),
    (
        "layer_norm_f32",
        r#"extern "C" __global__ void layer_norm_f32(const float* x, const float* gamma, const float* beta, float* y,
        float* stats, unsigned int rows, unsigned int d, float eps) {
    __shared__ float partial[256];
    for (unsigned int r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* xr = x + (size_t)r * d;
        float s = 0.0f;
        for (unsigned int i = threadIdx.x; i < d; i += blockDim.x) { s += xr[i]; }
        float mean = tessera_block_sum(partial, s) / (float)d;
        float v = 0.0f;
        for (unsigned int i = threadIdx.x; i < d; i += blockDim.x) { v += (xr[i] - mean) * (xr[i] - mean); }
        float rstd = 1.0f / sqrtf(tessera_block_sum(partial, v) / (float)d + eps);
        for (unsigned int i = threadIdx.x; i < d; i += blockDim.x) {
            y[(size_t)r * d + i] = (xr[i] - mean) * rstd * gamma[i] + beta[i];
        }
        if (threadIdx.x == 0) {
            stats[2 * (size_t)r] = mean;
            stats[2 * (size_t)r + 1] = rstd;
        }
    }
}"#,
    ),
    (
        "layer_norm_grad_add_f32",
        r#"extern "C" __global__ void layer_norm_grad_add_f32(const float* x, const float* gamma, const float* g,
        const float* stats, float* dx, unsigned int rows, unsigned int d) {
    __shared__ float partial[256];
    for (unsigned int r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* xr = x + (size_t)r * d;
        const float* gr = g + (size_t)r * d;
        float mean = stats[2 * (size_t)r], rstd = stats[2 * (size_t)r + 1];
        float s1 = 0.0f, s2 = 0.0f;
        for (unsigned int i = threadIdx.x; i < d; i += blockDim.x) {
            float dxhat = gr[i] * gamma[i];
            s1 += dxhat;
            s2 += dxhat * (xr[i] - mean) * rstd;
        }
        float m1 = tessera_block_sum(partial, s1) / (float)d;
        float m2 = tessera_block_sum(partial, s2) / (float)d;
        for (unsigned int i = threadIdx.x; i < d; i += blockDim.x) {
            float xhat = (xr[i] - mean) * rstd;
            dx[(size_t)r * d + i] += rstd * (gr[i] * gamma[i] - m1 - xhat * m2);
        }
    }
}"#,
    ),
    (
        "layer_norm_gamma_grad_add_f32",
        r#"extern "C" __global__ void layer_norm_gamma_grad_add_f32(const float* x, const float* g, const float* stats,
        float* dgamma, unsigned int rows, unsigned int d) {
    // Σ over rows of g · x̂, x̂ = (x − mean) · rstd of the row.
    __shared__ float partial[256];
    tessera_block_column_sums(partial, rows, d, dgamma, [=](unsigned int r, unsigned int j) {
        size_t at = (size_t)r * d + j;
        return g[at] * (x[at] - stats[2 * (size_t)r]) * stats[2 * (size_t)r + 1];
    });
}"#,
    ),
    (
        "embedding_f32",
        r#"extern "C" __global__ void embedding_f32(const int* ids, const float* table, float* y, unsigned int n,
        unsigned int d, unsigned int vocab) {
    // Ids are checked against the vocabulary when they are set; one out of range anyway
    // (filled on the device) gives a row of NaN, never a read outside the table.
    TESSERA_LOOP(k, n * d) {
        int id = ids[k / d];
        y[k] = (id >= 0 && (unsigned int)id < vocab) ? table[(size_t)id * d + k % d] : __int_as_float(0x7fc00000);
    }
}"#,
    ),
    (
        "embedding_grad_add_f32",
        r#"extern "C" __global__ void embedding_grad_add_f32(const int* ids, const float* g, float* dtable, unsigned int n,
        unsigned int d, unsigned int vocab) {
    // Rows of the same id add up with atomics (their order, and so the last bits, vary).
    TESSERA_LOOP(k, n * d) {
        int id = ids[k / d];
        if (id >= 0 && (unsigned int)id < vocab) { atomicAdd(&dtable[(size_t)id * d + k % d], g[k]); }
    }
}"#,
    ),
    (
        "sparse_matmul_add_f32",
        r#"extern "C" __global__ void sparse_matmul_add_f32(const int* rows, const int* cols, const float* values,
        const float* x, float* y, unsigned int entries, unsigned int n, unsigned int row_limit,
        unsigned int col_limit) {
    // y [row_limit, n] += A · x [col_limit, n] for A in coordinate form. Entries sharing a
    // row add up with atomics (their order, and so the last bits, vary). Ids are checked
    // when they are set; one out of range anyway (filled on the device) is skipped.
    TESSERA_LOOP(k, entries * n) {
        unsigned int e = k / n, j = k % n;
        int r = rows[e], c = cols[e];
        if (r >= 0 && (unsigned int)r < row_limit && c >= 0 && (unsigned int)c < col_limit) {
            atomicAdd(&y[(size_t)r * n + j], values[e] * x[(size_t)c * n + j]);
        }
    }
}"#,
    ),
    (
        "sparse_matmul_values_grad_add_f32",
        r#"extern "C" __global__ void sparse_matmul_values_grad_add_f32(const int* rows, const int* cols,
        const float* g, const float* x, float* dvalues, unsigned int entries, unsigned int n,
        unsigned int row_limit, unsigned int col_limit) {
    // dvalues[e] += g[rows[e]] · x[cols[e]] (rows of n), one thread per entry.
    TESSERA_LOOP(e, entries) {
        int r = rows[e], c = cols[e];
        if (r >= 0 && (unsigned int)r < row_limit && c >= 0 && (unsigned int)c < col_limit) {
            float sum = 0.0f;
            for (unsigned int j = 0; j < n; ++j) { sum += g[(size_t)r * n + j] * x[(size_t)c * n + j]; }
            dvalues[e] += sum;
        }
    }
}"#,
    ),
    (
        "embedding_grad_grouped_f32",
        r#"extern "C" __global__ void embedding_grad_grouped_f32(const unsigned int* keys, const unsigned int* starts,
        const unsigned int* order, const float* g, float* dtable, unsigned int groups, unsigned int d,
        unsigned int vocab) {
    // dtable[keys[i]] += g[p] for the positions p = order[starts[i]..starts[i + 1]] of group i
    // (its id's positions, ascending), in that order: one thread per (group, column), so the
    // sums are the same every run (and the CPU's order). Keys were checked on the host.
    TESSERA_LOOP(k, groups * d) {
        unsigned int i = k / d, j = k % d, id = keys[i];
        if (id >= vocab) { continue; }
        float acc = dtable[(size_t)id * d + j];
        for (unsigned int q = starts[i]; q < starts[i + 1]; ++q) { acc += g[(size_t)order[q] * d + j]; }
        dtable[(size_t)id * d + j] = acc;
    }
}"#,
    ),
    (
        "sparse_matmul_grouped_f32",
        r#"extern "C" __global__ void sparse_matmul_grouped_f32(const unsigned int* keys, const unsigned int* starts,
        const unsigned int* order, const int* others, const float* values, const float* x, float* y,
        unsigned int groups, unsigned int n, unsigned int key_limit, unsigned int other_limit) {
    // y[keys[i]] += values[e] · x[others[e]] (rows of n) for the entries e =
    // order[starts[i]..starts[i + 1]] of group i (ascending), in that order: one thread per
    // (group, column), so the sums are the same every run. Forward: keys are the rows,
    // others the columns; the input gradient swaps them. An id out of range is skipped.
    TESSERA_LOOP(k, groups * n) {
        unsigned int i = k / n, j = k % n, key = keys[i];
        if (key >= key_limit) { continue; }
        float acc = y[(size_t)key * n + j];
        for (unsigned int q = starts[i]; q < starts[i + 1]; ++q) {
            unsigned int e = order[q];
            int other = others[e];
            if (other >= 0 && (unsigned int)other < other_limit) { acc += values[e] * x[(size_t)other * n + j]; }
        }
        y[(size_t)key * n + j] = acc;
    }
}"#,
    ),
    (
        "step_gather_f32",
        r#"extern "C" __global__ void step_gather_f32(const float* src, float* dst, unsigned int b, unsigned int t,
        unsigned int d, unsigned int step, int add) {
    // dst [B, D] (=, or += when add) step `step` of src [B, T, D].
    TESSERA_LOOP(k, b * d) {
        float v = src[((size_t)(k / d) * t + step) * d + k % d];
        dst[k] = add ? dst[k] + v : v;
    }
}"#,
    ),
    (
        "step_scatter_f32",
        r#"extern "C" __global__ void step_scatter_f32(const float* src, float* dst, unsigned int b, unsigned int t,
        unsigned int d, unsigned int step, int add) {
    // Step `step` of dst [B, T, D] (=, or += when add) src [B, D].
    TESSERA_LOOP(k, b * d) {
        size_t at = ((size_t)(k / d) * t + step) * d + k % d;
        dst[at] = add ? dst[at] + src[k] : src[k];
    }
}"#,
    ),
    (
        "broadcast_rows_f32",
        r#"extern "C" __global__ void broadcast_rows_f32(const float* row, float* y, unsigned int n, unsigned int cols) {
    TESSERA_LOOP(i, n) { y[i] = row[i % cols]; }
}"#,
    ),
    (
        "gru_gates_f32",
        r#"extern "C" __global__ void gru_gates_f32(const float* gx, const float* gh, const float* h, float* gates, float* y,
        unsigned int b, unsigned int hs) {
    // gx, gh [B, 3H] (gates r | z | n); gates [3, B, H] saved for backward: r, z, n.
    unsigned int bh = b * hs;
    TESSERA_LOOP(o, bh) {
        unsigned int bi = o / hs, j = o % hs;
        const float* x = gx + (size_t)bi * 3 * hs;
        const float* hh = gh + (size_t)bi * 3 * hs;
        float r = 1.0f / (1.0f + expf(-(x[j] + hh[j])));
        float z = 1.0f / (1.0f + expf(-(x[hs + j] + hh[hs + j])));
        float nv = tanhf(x[2 * hs + j] + r * hh[2 * hs + j]);
        gates[o] = r;
        gates[bh + o] = z;
        gates[2 * bh + o] = nv;
        y[o] = (1.0f - z) * nv + z * h[o];
    }
}"#,
    ),
    (
        "gru_grad_f32",
        r#"extern "C" __global__ void gru_grad_f32(const float* g, const float* h, const float* gh, const float* gates,
        float* dga, float* dgh, unsigned int b, unsigned int hs) {
    // The gradients of the cell's pre-activations from the input side (dga [B, 3H]) and
    // the hidden side (dgh [B, 3H]); they differ in the n gate, which r scales.
    unsigned int bh = b * hs;
    TESSERA_LOOP(o, bh) {
        unsigned int bi = o / hs, j = o % hs;
        float gv = g[o], r = gates[o], z = gates[bh + o], nv = gates[2 * bh + o];
        float dn = gv * (1.0f - z);
        float dz = gv * (h[o] - nv);
        float dan = dn * (1.0f - nv * nv);
        float ghn = gh[(size_t)bi * 3 * hs + 2 * hs + j];
        float dar = dan * ghn * r * (1.0f - r);
        float daz = dz * z * (1.0f - z);
        size_t base = (size_t)bi * 3 * hs;
        dga[base + j] = dar;
        dga[base + hs + j] = daz;
        dga[base + 2 * hs + j] = dan;
        dgh[base + j] = dar;
        dgh[base + hs + j] = daz;
        dgh[base + 2 * hs + j] = dan * r;
    }
}"#,
    ),
    (
        "heads_split_f32",
        r#"extern "C" __global__ void heads_split_f32(const float* x, float* xh, unsigned int b, unsigned int t,
        unsigned int d, unsigned int heads) {
    // x [B, T, D] → xh [B·heads, T, D / heads]: each head's columns as contiguous matrices.
    unsigned int dh = d / heads;
    TESSERA_LOOP(k, b * t * d) {
        unsigned int bi = k / (t * d), ti = (k / d) % t, c = k % d;
        xh[(((size_t)bi * heads + c / dh) * t + ti) * dh + c % dh] = x[k];
    }
}"#,
    ),
    (
        "heads_merge_f32",
        r#"extern "C" __global__ void heads_merge_f32(const float* xh, float* x, unsigned int b, unsigned int t,
        unsigned int d, unsigned int heads, int add) {
    // The inverse of heads_split_f32 (=, or += when add).
    unsigned int dh = d / heads;
    TESSERA_LOOP(k, b * t * d) {
        unsigned int bi = k / (t * d), ti = (k / d) % t, c = k % d;
        float v = xh[(((size_t)bi * heads + c / dh) * t + ti) * dh + c % dh];
        x[k] = add ? x[k] + v : v;
    }
}"#,
    ),
    (
        "attention_softmax_f32",
        r#"extern "C" __global__ void attention_softmax_f32(float* p, unsigned int rows, unsigned int t, int causal) {
    // Softmax of each row of the score matrices [rows / t of t × t], in place; with
    // `causal`, row i attends only to columns ≤ i (the others get probability 0).
    __shared__ float partial[256];
    for (unsigned int r = blockIdx.x; r < rows; r += gridDim.x) {
        float* row = p + (size_t)r * t;
        unsigned int valid = causal ? r % t + 1 : t;
        float m = -__int_as_float(0x7f800000);
        for (unsigned int j = threadIdx.x; j < valid; j += blockDim.x) { m = fmaxf(m, row[j]); }
        m = tessera_block_max(partial, m);
        float s = 0.0f;
        for (unsigned int j = threadIdx.x; j < valid; j += blockDim.x) {
            float e = expf(row[j] - m);
            row[j] = e;
            s += e;
        }
        float inv = 1.0f / tessera_block_sum(partial, s);
        for (unsigned int j = threadIdx.x; j < t; j += blockDim.x) { row[j] = j < valid ? row[j] * inv : 0.0f; }
    }
}"#,
    ),
    (
        "attention_softmax_grad_f32",
        r#"extern "C" __global__ void attention_softmax_grad_f32(const float* p, float* ds, unsigned int rows,
        unsigned int t, float scale) {
    // From the gradient of the probabilities to that of the scaled scores, in place:
    // ds = p · (ds − Σ ds·p) · scale, row by row.
    __shared__ float partial[256];
    for (unsigned int r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* pr = p + (size_t)r * t;
        float* dr = ds + (size_t)r * t;
        float s = 0.0f;
        for (unsigned int j = threadIdx.x; j < t; j += blockDim.x) { s += dr[j] * pr[j]; }
        s = tessera_block_sum(partial, s);
        for (unsigned int j = threadIdx.x; j < t; j += blockDim.x) { dr[j] = pr[j] * (dr[j] - s) * scale; }
    }
}"#,
    ),
    (
        "darray_map_f32",
        r#"extern "C" __global__ void darray_map_f32(const float* x, float* y, unsigned int n, int op, float a) {
    TESSERA_LOOP(i, n) {
        float v = x[i];
        switch (op) {
        case 0: v = -v; break;
        case 1: v = fabsf(v); break;
        case 2: v = sqrtf(v); break;
        case 3: v = expf(v); break;
        case 4: v = logf(v); break;
        case 5: v = v * v; break;
        case 6: v = fmaxf(v, 0.0f); break;
        case 7: v = a * v; break;
        case 8: v = v + a; break;
        case 9: v = powf(v, a); break;
        default: v = 1.0f / (1.0f + expf(-v)); break;
        }
        y[i] = v;
    }
}"#,
    ),
    (
        "darray_zip_f32",
        r#"extern "C" __global__ void darray_zip_f32(const float* a, const float* b, float* y, unsigned int n, int op) {
    TESSERA_LOOP(i, n) {
        float u = a[i], v = b[i];
        switch (op) {
        case 0: u = u + v; break;
        case 1: u = u - v; break;
        case 2: u = u * v; break;
        case 3: u = u / v; break;
        case 4: u = fminf(u, v); break;
        default: u = fmaxf(u, v); break;
        }
        y[i] = u;
    }
}"#,
    ),
    (
        "darray_reduce_f32",
        r#"extern "C" __global__ void darray_reduce_f32(const float* x, double* partial, unsigned int n, int op) {
    __shared__ double scratch[256];
    double acc = op == 0 ? 0.0 : (double)__int_as_float(0x7fc00000);
    TESSERA_LOOP(i, n) { acc = tessera_reduce_op(op, acc, (double)x[i]); }
    acc = tessera_block_reduce(scratch, acc, [op](double a, double b) { return tessera_reduce_op(op, a, b); });
    if (threadIdx.x == 0) { partial[blockIdx.x] = acc; }
}"#,
    ),
    (
        "darray_reduce_f64",
        r#"extern "C" __global__ void darray_reduce_f64(const double* x, double* partial, unsigned int n, int op) {
    __shared__ double scratch[256];
    double acc = op == 0 ? 0.0 : (double)__int_as_float(0x7fc00000);
    TESSERA_LOOP(i, n) { acc = tessera_reduce_op(op, acc, x[i]); }
    acc = tessera_block_reduce(scratch, acc, [op](double a, double b) { return tessera_reduce_op(op, a, b); });
    if (threadIdx.x == 0) { partial[blockIdx.x] = acc; }
}"#,
    ),
    (
        "darray_transpose_f32",
        r#"extern "C" __global__ void darray_transpose_f32(const float* x, float* y, unsigned int rows, unsigned int cols) {
    // Tiles of 32×32 through shared memory (one column of padding against bank conflicts):
    // each of the 8 warps of a block reads rows of a tile and writes columns of it, so
    // both the reads and the writes of a warp are 32 adjacent floats.
    __shared__ float tile[32][33];
    unsigned int lane = threadIdx.x % 32, group = threadIdx.x / 32, groups = blockDim.x / 32;
    unsigned int tile_cols = (cols + 31) / 32, tiles = ((rows + 31) / 32) * tile_cols;
    for (unsigned int t = blockIdx.x; t < tiles; t += gridDim.x) {
        unsigned int r0 = (t / tile_cols) * 32, c0 = (t % tile_cols) * 32;
        for (unsigned int k = group; k < 32; k += groups) {
            unsigned int r = r0 + k, c = c0 + lane;
            if (r < rows && c < cols) { tile[k][lane] = x[(size_t)r * cols + c]; }
        }
        __syncthreads();
        for (unsigned int k = group; k < 32; k += groups) {
            unsigned int c = c0 + k, r = r0 + lane;
            if (r < rows && c < cols) { y[(size_t)c * rows + r] = tile[lane][k]; }
        }
        __syncthreads();
    }
}"#,
    ),
];
