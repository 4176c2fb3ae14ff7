//! GPU tour: device discovery, cuBLAS f32 and cuBLASLt bf16 GEMMs with their TFLOP/s, the
//! NVRTC kernels, a cuSPARSE SpMV and SpMM, a distributed array on every GPU checked against
//! the CPU, conjugate gradient with a sparse matrix on every GPU, and training the MLP and
//! the CNN on digits on the GPU (test accuracy and samples/s beside the same training on the
//! CPU). Runs on a machine without a GPU too, and says what it skipped.
//!
//! Run it: `cargo run --release --features cuda --example gpu [-- --small]`
//! (with the CUDA libraries on `LD_LIBRARY_PATH`; see `scripts/gpu-check.sh`). `--small`
//! runs every part at small sizes and for few epochs: a check that the tour runs (CI runs
//! it on the host GPU), not figures.
#[cfg(feature = "cuda")]
fn main() -> anyhow::Result<()> {
    use std::sync::Arc;
    use std::time::Instant;
    use tessera::{cuda_devices, Gpu};

    let devices = match cuda_devices() {
        Ok(devices) => devices,
        Err(error) => {
            println!("skipped: {error}");
            return Ok(());
        }
    };
    for d in &devices {
        println!("device {}: {} ({:.1} GiB)", d.ordinal, d.name, d.total_memory as f64 / (1u64 << 30) as f64);
    }
    let small = std::env::args().any(|arg| arg == "--small");
    let gpu = Gpu::open(0)?;
    let (f32_sizes, bf16_sizes): (&[usize], &[usize]) =
        if small { (&[64, 128], &[128]) } else { (&[1024, 4096, 8192], &[4096, 8192]) };
    for &n in f32_sizes {
        let a = gpu.upload(&vec![1.0f32; n * n])?;
        let b = gpu.upload(&vec![0.5f32; n * n])?;
        let mut c = gpu.zeros(n * n)?;
        gpu.sgemm((n, n, n), &a, &b, &mut c)?; // warm-up (handle creation, heuristics)
        gpu.synchronize()?;
        let reps = if small {
            2
        } else if n >= 8192 {
            10
        } else {
            50
        };
        let start = Instant::now();
        for _ in 0..reps {
            gpu.sgemm((n, n, n), &a, &b, &mut c)?;
        }
        gpu.synchronize()?;
        let seconds = start.elapsed().as_secs_f64() / reps as f64;
        let check = gpu.sum(&c)? / (n * n) as f32;
        println!(
            "sgemm {n}³: {:.2} ms, {:.1} TFLOP/s (each entry {check}, expected {})",
            seconds * 1e3,
            2.0 * (n as f64).powi(3) / seconds / 1e12,
            0.5 * n as f32
        );
    }
    for &n in bf16_sizes {
        let a = gpu.upload_bf16(&vec![1.0f32; n * n])?;
        let b = gpu.upload_bf16(&vec![0.5f32; n * n])?;
        let mut c = gpu.zeros_bf16(n * n)?;
        gpu.gemm_bf16((n, n, n), &a, &b, &mut c)?; // warm-up (handle, heuristic)
        gpu.synchronize()?;
        let reps = if small { 2 } else { 20 };
        let start = Instant::now();
        for _ in 0..reps {
            gpu.gemm_bf16((n, n, n), &a, &b, &mut c)?;
        }
        gpu.synchronize()?;
        let seconds = start.elapsed().as_secs_f64() / reps as f64;
        let corner = gpu.download_bf16(&c)?[0];
        println!(
            "bf16 gemm {n}³ (f32 accumulation): {:.2} ms, {:.1} TFLOP/s (entry {corner}, expected {})",
            seconds * 1e3,
            2.0 * (n as f64).powi(3) / seconds / 1e12,
            0.5 * n as f32
        );
    }
    let mut logits = gpu.upload(&[1.0, 2.0, 3.0])?;
    gpu.softmax_rows(&mut logits, 1, 3)?;
    println!("softmax([1, 2, 3]) = {:?}", gpu.download(&logits)?);

    // Sparse: the 1-D Laplacian (tridiagonal 2, -1) times ones is 1 at both ends, 0 inside.
    let n = if small { 1_000 } else { 1_000_000 };
    let mut triplets = sprs::TriMat::new((n, n));
    for i in 0..n {
        triplets.add_triplet(i, i, 2.0f32);
        if i > 0 {
            triplets.add_triplet(i, i - 1, -1.0);
        }
        if i + 1 < n {
            triplets.add_triplet(i, i + 1, -1.0);
        }
    }
    let a = gpu.upload_csr(&triplets.to_csr())?;
    let x = gpu.upload(&vec![1.0f32; n])?;
    let mut y = gpu.zeros(n)?;
    gpu.spmv(&a, &x, &mut y)?;
    let start = Instant::now();
    gpu.spmv(&a, &x, &mut y)?;
    let spmv = start.elapsed().as_secs_f64();
    let y = gpu.download(&y)?;
    println!(
        "spmv (1-D Laplacian, {n} rows, {} nonzeros): {:.3} ms; y[0] = {}, y[1] = {}, sum = {}",
        a.nnz(),
        spmv * 1e3,
        y[0],
        y[1],
        y.iter().sum::<f32>()
    );
    let cols = 16;
    let b = gpu.upload(&vec![1.0f32; n * cols])?;
    let mut c = gpu.zeros(n * cols)?;
    gpu.spmm(&a, &b, cols, &mut c)?;
    let start = Instant::now();
    gpu.spmm(&a, &b, cols, &mut c)?;
    let spmm = start.elapsed().as_secs_f64();
    let c = gpu.download(&c)?;
    println!("spmm (same matrix × {n}×{cols} ones): {:.3} ms; row 0 = {:?}", spmm * 1e3, &c[..cols]);

    distributed_array(if small { 256 } else { 4096 })?;
    train_digits(Arc::new(gpu), if small { 10 } else { 1 })
}

/// A distributed array on every GPU (`DeviceDArray`, 2×2 chunks): `a · sigmoid(a)` and its
/// sum, checked against the same `DArray` operations on the CPU (the tour fails if they
/// disagree).
#[cfg(feature = "cuda")]
fn distributed_array(n: usize) -> anyhow::Result<()> {
    use std::time::Instant;
    use tessera::{DArray, DeviceActor, Fill, ReduceOp, Runtime, UnaryOp};

    let rt = Runtime::local()?;
    let gpus = DeviceActor::all(&rt)?;
    let a =
        DArray::<f32>::fill(&rt, &[n, n], &[n / 2, n / 2], Fill::Uniform { seed: 7, low: -1.0, high: 1.0 })?;
    let on_gpus = a.to_devices(&gpus)?;
    on_gpus.wait()?;
    let start = Instant::now();
    let product = on_gpus.matmul(&on_gpus.map(UnaryOp::Sigmoid))?;
    product.wait()?;
    let seconds = start.elapsed().as_secs_f64();
    let total = product.reduce(ReduceOp::Sum)?;
    let start = Instant::now();
    let expected = a.matmul(&a.map(UnaryOp::Sigmoid))?;
    let expected_array = expected.to_array()?;
    let cpu_seconds = start.elapsed().as_secs_f64();
    let got = product.to_array()?;
    let worst = got.iter().zip(expected_array.iter()).map(|(g, e)| (g - e).abs()).fold(0.0f32, f32::max);
    let expected_total = expected.reduce(ReduceOp::Sum)?.blocking_get()?;
    let copies: u64 = gpus.iter().map(DeviceActor::copies_in).sum();
    println!(
        "darray on {} GPU(s): a·sigmoid(a), {n}² in 2×2 chunks: {:.1} ms on the GPUs ({} tile copies \
         between devices), {:.1} ms on the CPU; largest difference {worst:.2e}; sum {total:.4e} vs {expected_total:.4e}",
        gpus.len(),
        seconds * 1e3,
        copies,
        cpu_seconds * 1e3
    );
    if worst > 1e-3 * (n as f32).sqrt()
        || (total - expected_total).abs() > 1e-3 * expected_total.abs().max(1.0)
    {
        anyhow::bail!("the GPUs' product differs from the CPU's (largest difference {worst})");
    }
    conjugate_gradient(&rt, &gpus, if n <= 256 { 64 } else { 300 })?;
    rt.shutdown();
    Ok(())
}

/// Conjugate gradient for the 2-D Laplacian of an `n×n` grid (`n²` unknowns, 4 blocks of
/// rows), entirely on the GPUs: cuSPARSE products per block, and the vector updates and
/// dot products as distributed-array operations; the true residual is checked on the CPU.
#[cfg(feature = "cuda")]
fn conjugate_gradient(rt: &tessera::Runtime, gpus: &[tessera::DeviceActor], n: usize) -> anyhow::Result<()> {
    use std::time::Instant;
    use tessera::{BinaryOp, DArray, DeviceDArray, Fill, ReduceOp, SparseDArray, UnaryOp};

    let block = (n * n).div_ceil(4);
    let a = SparseDArray::<f32>::poisson_2d(rt, n, block)?;
    let b = DArray::<f32>::fill(rt, &[n * n], &[block], Fill::Constant(1.0))?;
    let (a_gpu, b_gpu) = (a.to_devices(gpus)?, b.to_devices(gpus)?);
    a_gpu.wait()?;
    let dot = |u: &DeviceDArray, v: &DeviceDArray| -> tessera::Result<f32> {
        u.zip(v, BinaryOp::Mul)?.reduce(ReduceOp::Sum)
    };
    let axpy = |alpha: f32, x: &DeviceDArray, y: &DeviceDArray| {
        x.map(UnaryOp::Scale(f64::from(alpha))).zip(y, BinaryOp::Add)
    };
    let start = Instant::now();
    let mut x = b_gpu.map(UnaryOp::Scale(0.0));
    let (mut r, mut p) = (b_gpu.clone(), b_gpu.clone());
    let mut rs = dot(&r, &r)?;
    let b_norm = rs.sqrt();
    let (mut iterations, limit) = (0, 4 * n);
    while rs.sqrt() > 1e-4 * b_norm && iterations < limit {
        let ap = a_gpu.matmul(&p)?;
        let alpha = rs / dot(&p, &ap)?;
        x = axpy(alpha, &p, &x)?;
        r = axpy(-alpha, &ap, &r)?;
        let rs_next = dot(&r, &r)?;
        p = axpy(rs_next / rs, &p, &r)?;
        rs = rs_next;
        iterations += 1;
    }
    x.wait()?;
    let seconds = start.elapsed().as_secs_f64();
    // The normwise backward error ‖b − A·x‖ / (‖A‖·‖x‖ + ‖b‖), with ‖A‖ ≤ 8 for this
    // matrix: what f32 arithmetic can promise, where ‖b − A·x‖ / ‖b‖ alone is limited by
    // the rounding of A·x when x is large.
    let residual = a.matmul(&x.to_darray())?.zip(&b, BinaryOp::Sub)?.map(UnaryOp::Square);
    let residual = residual.reduce(ReduceOp::Sum)?.blocking_get()?.sqrt();
    let x_norm = dot(&x, &x)?.sqrt();
    let backward_error = residual / (8.0 * x_norm + b_norm);
    println!(
        "conjugate gradient, 2-D Laplacian with {} unknowns on {} GPU(s): {iterations} iterations in {:.1} ms \
         ({:.0} iterations/s), relative residual {:.1e}, backward error {backward_error:.1e}",
        n * n,
        gpus.len(),
        seconds * 1e3,
        iterations as f64 / seconds,
        residual / b_norm
    );
    if rs.sqrt() > 1e-4 * b_norm || backward_error > 1e-6 {
        anyhow::bail!(
            "conjugate gradient did not converge: backward error {backward_error:.1e} after {iterations} iterations"
        );
    }
    Ok(())
}

/// Trains the MLP and the CNN of the zoo on digits on the GPU and on the CPU with the same
/// seeds (for a `shorter` times fewer epochs), and prints test accuracy and training
/// samples/s of both.
#[cfg(feature = "cuda")]
fn train_digits(gpu: std::sync::Arc<tessera::Gpu>, shorter: usize) -> anyhow::Result<()> {
    use tessera::nn::{
        lenet, mlp, Dataset, Evaluator, GpuDataset, GpuTrainer, OptimizerConfig, TrainState, Trainer,
    };

    let local = std::path::Path::new("data/digits.csv");
    let source = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits.csv"));
    let (train, test) = Dataset::digits(if local.exists() { local } else { source })?.split(0.2, 42);
    let device_train = GpuDataset::upload(&gpu, &train, 10)?;
    let sizes = [64, 128, 64, 10];
    let runs = [
        ("mlp", mlp(64, &sizes)?, mlp(test.len(), &sizes)?, OptimizerConfig::adam(1e-3), 40),
        ("cnn", lenet(64, 8, 10)?, lenet(test.len(), 8, 10)?, OptimizerConfig::adamw(3e-3, 1e-4), 30),
    ];
    for (name, model, eval, config, epochs) in runs {
        let epochs = (epochs / shorter).max(2);
        let mut evaluator = Evaluator::new(eval);
        let mut gpu_state = TrainState::new(&model, config, train.len(), 64, 1);
        let mut cpu_state = gpu_state.clone();
        let mut trainer = GpuTrainer::new(gpu.clone(), model.clone(), &gpu_state)?;
        let (mut gpu_seconds, mut gpu_samples) = (0.0, 0);
        for epoch in 0..epochs {
            let stats = trainer.train_epoch(&mut gpu_state, &device_train)?;
            if epoch > 0 {
                // The first epoch compiles the kernels.
                gpu_seconds += stats.seconds;
                gpu_samples += stats.samples;
            }
            if (epoch + 1) % 10 == 0 || epoch + 1 == epochs {
                let e = evaluator.classify(&gpu_state.params, &test)?;
                println!(
                    "{name} on the GPU, epoch {:3}: loss {:.4}, train acc {:.2}%, test acc {:.2}%, {:.0} samples/s",
                    epoch + 1,
                    stats.loss,
                    100.0 * stats.accuracy,
                    100.0 * e.accuracy,
                    stats.samples_per_second()
                );
            }
        }
        let gpu_acc = evaluator.classify(&gpu_state.params, &test)?.accuracy;
        let mut cpu = Trainer::new(model);
        let (mut cpu_seconds, mut cpu_samples) = (0.0, 0);
        for _ in 0..epochs {
            let stats = cpu.train_epoch(&mut cpu_state, &train)?;
            cpu_seconds += stats.seconds;
            cpu_samples += stats.samples;
        }
        let cpu_acc = evaluator.classify(&cpu_state.params, &test)?.accuracy;
        println!(
            "{name}: {epochs} epochs; GPU test accuracy {:.2}% at {:.0} samples/s; CPU (one thread) {:.2}% at {:.0} samples/s",
            100.0 * gpu_acc,
            gpu_samples as f64 / gpu_seconds.max(1e-9),
            100.0 * cpu_acc,
            cpu_samples as f64 / cpu_seconds.max(1e-9)
        );
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn main() {
    println!("skipped: built without the `cuda` feature (cargo run --release --features cuda --example gpu)");
}
