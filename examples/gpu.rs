//! GPU tour: device discovery, a cuBLAS GEMM with its TFLOP/s, and the NVRTC kernels.
//! Runs on a machine without a GPU too, and says what it skipped.
//!
//! Run it: `cargo run --release --features cuda --example gpu`
//! (with the CUDA libraries on `LD_LIBRARY_PATH`; see `scripts/gpu-check.sh`).
#[cfg(feature = "cuda")]
fn main() -> anyhow::Result<()> {
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
    let gpu = Gpu::open(0)?;
    for n in [1024usize, 4096, 8192] {
        let a = gpu.upload(&vec![1.0f32; n * n])?;
        let b = gpu.upload(&vec![0.5f32; n * n])?;
        let mut c = gpu.zeros(n * n)?;
        gpu.sgemm((n, n, n), &a, &b, &mut c)?; // warm-up (handle creation, heuristics)
        gpu.synchronize()?;
        let reps = if n >= 8192 { 10 } else { 50 };
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
    let mut logits = gpu.upload(&[1.0, 2.0, 3.0])?;
    gpu.softmax_rows(&mut logits, 1, 3)?;
    println!("softmax([1, 2, 3]) = {:?}", gpu.download(&logits)?);
    println!("not yet on the GPU: cuSPARSE SpMV, NCCL, model training (see the CUDA issue)");
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn main() {
    println!("skipped: built without the `cuda` feature (cargo run --release --features cuda --example gpu)");
}
