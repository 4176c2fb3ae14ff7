//! The `cuda` suite (feature `cuda`, on a machine with a GPU): GEMM at 8192³ in f32 (cuBLAS)
//! and bf16 with f32 accumulation (cuBLASLt) in TFLOP/s, CSR SpMV on a 2-D Poisson matrix
//! and a random matrix (10⁷ rows each) in GB/s beside the device's copy bandwidth measured
//! by the same command, the f32 product again as a distributed array in 4×4 tiles over every
//! GPU (`DeviceDArray`), MLP and CNN training on digits in samples/s (the CNN also as a
//! data-parallel replica in an NCCL group of one, for what averaging the gradients costs a
//! step), and the `nn` suite's character GRU and transformer language models in tokens/s.
//! Without a GPU it says so and reports nothing. `--small` runs every part at small sizes
//! and for a moment each (figures named `cuda-small/…`), to check that the suite runs.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tessera::nn::{
    char_gru, lenet, mlp, tiny_transformer, window_count, CommStats, Dataset, GpuDataset, GpuTrainer, Model,
    OptimizerConfig, TextCorpus, TrainState, TransformerConfig,
};
use tessera::{cuda_devices, DArray, DeviceActor, Fill, Gpu, GroupListener, NcclGroup};

use super::{median, Reporter};

/// The sizes of a run: the suite's, or `--small`'s.
struct Sizes {
    prefix: &'static str,
    copy_floats: usize,
    gemm: usize,
    poisson_side: usize,
    random_rows: usize,
    /// The SpMV figures' names: Poisson, random.
    spmv_labels: [&'static str; 2],
    epochs: usize,
    text_tokens: usize,
    text_seconds: f64,
}

const FULL: Sizes = Sizes {
    prefix: "cuda",
    copy_floats: 256 << 20, // 1 GiB
    gemm: 8192,
    poisson_side: 3163, // 10⁷ rows
    random_rows: 10_000_000,
    spmv_labels: ["poisson_1e7", "random_1e7_nnz10"],
    epochs: 5,
    text_tokens: usize::MAX,
    text_seconds: 3.0,
};

const SMALL: Sizes = Sizes {
    prefix: "cuda-small",
    copy_floats: 1 << 20,
    gemm: 128,
    poisson_side: 100,
    random_rows: 10_000,
    spmv_labels: ["poisson", "random_nnz10"],
    epochs: 1,
    text_tokens: 2048,
    text_seconds: 0.2,
};

pub(crate) fn run(reporter: &Reporter, small: bool) -> Result<()> {
    let sizes = if small { &SMALL } else { &FULL };
    let prefix = sizes.prefix;
    let devices = match cuda_devices() {
        Ok(devices) => devices,
        Err(error) => {
            eprintln!("cuda suite skipped: {error}");
            return Ok(());
        }
    };
    eprintln!("device 0: {}", devices[0].name);
    if small {
        eprintln!("small sizes: a check that every part of the suite runs, not figures to record");
    }
    let gpu = Gpu::open(0)?;

    // Copy bandwidth: device-to-device, counted as bytes read plus bytes written.
    let len = sizes.copy_floats;
    let src = gpu.zeros(len)?;
    let mut dst = gpu.zeros(len)?;
    gpu.copy(&src, &mut dst)?;
    gpu.synchronize()?;
    let mut samples = Vec::new();
    for _ in 0..10 {
        let start = Instant::now();
        gpu.copy(&src, &mut dst)?;
        gpu.synchronize()?;
        samples.push(2.0 * (len * 4) as f64 / start.elapsed().as_secs_f64() / 1e9);
    }
    let copy_gbps = median(&mut samples);
    reporter.report(&format!("{prefix}/copy_bandwidth"), copy_gbps, "GB/s", true);
    drop((src, dst));

    let n = sizes.gemm;
    let a = gpu.upload(&vec![1.0f32; n * n])?;
    let b = gpu.upload(&vec![1.0f32; n * n])?;
    let mut c = gpu.zeros(n * n)?;
    gpu.sgemm((n, n, n), &a, &b, &mut c)?;
    gpu.synchronize()?;
    samples.clear();
    for _ in 0..10 {
        let start = Instant::now();
        gpu.sgemm((n, n, n), &a, &b, &mut c)?;
        gpu.synchronize()?;
        samples.push(2.0 * (n as f64).powi(3) / start.elapsed().as_secs_f64() / 1e12);
    }
    reporter.report(&format!("{prefix}/gemm_f32_{n}"), median(&mut samples), "TFLOP/s", true);
    drop((a, b, c));

    let a = gpu.upload_bf16(&vec![1.0f32; n * n])?;
    let b = gpu.upload_bf16(&vec![1.0f32; n * n])?;
    let mut c = gpu.zeros_bf16(n * n)?;
    gpu.gemm_bf16((n, n, n), &a, &b, &mut c)?;
    gpu.synchronize()?;
    samples.clear();
    for _ in 0..10 {
        let start = Instant::now();
        gpu.gemm_bf16((n, n, n), &a, &b, &mut c)?;
        gpu.synchronize()?;
        samples.push(2.0 * (n as f64).powi(3) / start.elapsed().as_secs_f64() / 1e12);
    }
    reporter.report(&format!("{prefix}/gemm_bf16_{n}"), median(&mut samples), "TFLOP/s", true);
    drop((a, b, c));

    // The same f32 product as a distributed array in 4×4 tiles over every GPU of this
    // machine: what tiling, the device actors and (with several GPUs) tile copies cost
    // beside the one cuBLAS call above.
    {
        let rt = tessera::Runtime::builder().workers(2).build()?;
        let gpus = DeviceActor::all(&rt)?;
        let tile = n / 4;
        let a = DArray::<f32>::fill(&rt, &[n, n], &[tile, tile], Fill::Constant(1.0))?.to_devices(&gpus)?;
        a.wait()?;
        a.matmul(&a)?.wait()?;
        samples.clear();
        for _ in 0..5 {
            let start = Instant::now();
            a.matmul(&a)?.wait()?;
            samples.push(2.0 * (n as f64).powi(3) / start.elapsed().as_secs_f64() / 1e12);
        }
        let label = format!("{prefix}/darray_matmul_f32_{n}_tiles4x4");
        reporter.report(&label, median(&mut samples), "TFLOP/s", true);
        eprintln!("darray matmul over {} GPU(s), tiles of {tile}²", gpus.len());
        drop(a);
        rt.shutdown();
    }

    let [poisson_label, random_label] = sizes.spmv_labels;
    for (label, matrix) in
        [(poisson_label, poisson(sizes.poisson_side)), (random_label, random(sizes.random_rows, 10))]
    {
        let rows = matrix.rows();
        let bytes = (matrix.nnz() * 8 + (rows + 1) * 4 + matrix.cols() * 4 + rows * 4) as f64;
        let da = gpu.upload_csr(&matrix)?;
        drop(matrix);
        let x = gpu.upload(&vec![1.0f32; da.shape().1])?;
        let mut y = gpu.zeros(rows)?;
        gpu.spmv(&da, &x, &mut y)?;
        gpu.synchronize()?;
        // Products queue back to back (as in an iterative solver), so each sample times
        // ten of them and one wait, not a wait per product.
        samples.clear();
        for _ in 0..10 {
            let start = Instant::now();
            for _ in 0..10 {
                gpu.spmv(&da, &x, &mut y)?;
            }
            gpu.synchronize()?;
            samples.push(10.0 * bytes / start.elapsed().as_secs_f64() / 1e9);
        }
        let gbps = median(&mut samples);
        reporter.report(&format!("{prefix}/spmv_{label}"), gbps, "GB/s", true);
        eprintln!("spmv {label}: {:.0} % of the copy bandwidth", 100.0 * gbps / copy_gbps);
    }

    let gpu = Arc::new(gpu);
    // From the working directory when it has the data (the GPU machine runs a binary built
    // elsewhere, in a copy of the repository), else from the source tree.
    let local = std::path::Path::new("data/digits.csv");
    let path = if local.exists() {
        local
    } else {
        std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits.csv"))
    };
    let data = Dataset::digits(path)?;
    let device_data = GpuDataset::upload(&gpu, &data, 10)?;
    for (label, model) in [("mlp", mlp(64, &[64, 128, 64, 10])?), ("cnn", lenet(64, 8, 10)?)] {
        let (rate, _) = train_rate(model, &data, &device_data, sizes.epochs, |model, state| {
            GpuTrainer::new(gpu.clone(), model, state)
        })?;
        reporter.report(&format!("{prefix}/train_{label}_digits"), rate, "samples/s", true);
    }
    // The same CNN as a replica of an NCCL group of one (one GPU holds one rank): each step
    // also gathers the gradients into buckets (25 MiB, as PyTorch's DDP), all-reduces them
    // through NCCL and averages them.
    match nccl_group_of_one(&gpu) {
        Ok(group) => {
            let (rate, comm) =
                train_rate(lenet(64, 8, 10)?, &data, &device_data, sizes.epochs, |model, state| {
                    GpuTrainer::replica(Box::new(group), model, state, 25.0)
                })?;
            reporter.report(&format!("{prefix}/train_cnn_digits_nccl1"), rate, "samples/s", true);
            let per_step = |seconds: f64| seconds / comm.steps.max(1) as f64 * 1e6;
            eprintln!(
                "cnn as an NCCL replica of one, GPU time a step: forward and backward {:.0} µs, \
                 averaging (buckets, NCCL, scaling) {:.0} µs, of which the update waited for {:.0} µs",
                per_step(comm.compute_seconds),
                per_step(comm.reduce_seconds),
                per_step(comm.wait_seconds)
            );
        }
        Err(error) => eprintln!("NCCL replica figure skipped: {error:#}"),
    }

    // The language models of the `nn` suite, same sizes and text, on the GPU.
    let files = ["README.md", "src/nn/graph.rs"].map(|file| {
        let local = PathBuf::from(file);
        if local.exists() {
            local
        } else {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(file)
        }
    });
    let corpus = TextCorpus::from_files(&files).context("reading the text corpus")?;
    let vocab = corpus.vocab_size();
    let cfg = TransformerConfig { width: 64, heads: 4, layers: 2, ff: 256 };
    for (label, model, steps) in [
        ("char_gru", char_gru(32, 32, vocab, 32, 128)?, 32),
        ("tiny_transformer", tiny_transformer(16, 64, vocab, cfg)?, 64),
    ] {
        let ids = &corpus.ids[..corpus.ids.len().min(sizes.text_tokens)];
        let rate = text_rate(&gpu, model, ids, steps, sizes.text_seconds)?;
        reporter.report(&format!("{prefix}/train_{label}_tokens"), rate, "tokens/s", true);
    }
    Ok(())
}

/// Tokens/s of GPU language-model training over `ids` (Adam) for about `seconds`, after
/// one warm-up epoch.
fn text_rate(gpu: &Arc<Gpu>, model: Model, ids: &[i32], steps: usize, seconds: f64) -> Result<f64> {
    let batch = model.graph.shape(model.input)?[0];
    let mut state =
        TrainState::new(&model, OptimizerConfig::adam(3e-3), window_count(ids.len(), steps), batch, 1);
    let mut trainer = GpuTrainer::new(gpu.clone(), model, &state)?;
    trainer.train_epoch_text(&mut state, ids, steps)?;
    let (start, mut tokens) = (Instant::now(), 0);
    while start.elapsed().as_secs_f64() < seconds {
        tokens += trainer.train_epoch_text(&mut state, ids, steps)?.samples;
    }
    Ok(tokens as f64 / start.elapsed().as_secs_f64())
}

/// Median samples/s of `epochs` GPU training epochs over all of digits (batch 64, Adam) by
/// the trainer `make` returns, after one warm-up epoch (kernel compilation, cuBLAS
/// handles); and the trainer's [`CommStats`] at the end (a replica's).
fn train_rate(
    model: Model,
    data: &Dataset,
    device_data: &GpuDataset,
    epochs: usize,
    make: impl FnOnce(Model, &mut TrainState) -> Result<GpuTrainer, tessera::nn::NnError>,
) -> Result<(f64, CommStats)> {
    let mut state = TrainState::new(&model, OptimizerConfig::adam(1e-3), data.len(), 64, 1);
    let mut trainer = make(model, &mut state)?;
    trainer.train_epoch(&mut state, device_data)?;
    let mut samples: Vec<f64> = (0..epochs)
        .map(|_| trainer.train_epoch(&mut state, device_data).map(|s| s.samples_per_second()))
        .collect::<Result<_, _>>()?;
    Ok((median(&mut samples), trainer.comm_stats()))
}

/// An NCCL group of one rank on `gpu`, its id handed over by a TCP group of one.
fn nccl_group_of_one(gpu: &Arc<Gpu>) -> Result<NcclGroup> {
    let listener = GroupListener::bind(0, 1, [127, 0, 0, 1].into(), "bench", Duration::from_secs(30))?;
    let addr = listener.addr();
    let mut bootstrap = listener.connect(&[addr])?;
    Ok(NcclGroup::join(gpu.clone(), &mut bootstrap)?)
}

/// The 5-point Laplacian on an `n × n` grid.
fn poisson(n: usize) -> sprs::CsMat<f32> {
    let mut indptr = Vec::with_capacity(n * n + 1);
    let mut indices = Vec::with_capacity(5 * n * n);
    let mut data = Vec::with_capacity(5 * n * n);
    indptr.push(0);
    for i in 0..n {
        for j in 0..n {
            let row = i * n + j;
            let mut push = |col: usize, v: f32| {
                indices.push(col);
                data.push(v);
            };
            if i > 0 {
                push(row - n, -1.0);
            }
            if j > 0 {
                push(row - 1, -1.0);
            }
            push(row, 4.0);
            if j + 1 < n {
                push(row + 1, -1.0);
            }
            if i + 1 < n {
                push(row + n, -1.0);
            }
            indptr.push(indices.len());
        }
    }
    sprs::CsMat::new((n * n, n * n), indptr, indices, data)
}

/// A square matrix with `per_row` entries at pseudo-random sorted columns in each row.
fn random(rows: usize, per_row: usize) -> sprs::CsMat<f32> {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut indptr = Vec::with_capacity(rows + 1);
    let mut indices = Vec::with_capacity(rows * per_row);
    indptr.push(0);
    for _ in 0..rows {
        let start = indices.len();
        while indices.len() - start < per_row {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let col = (state % rows as u64) as usize;
            if !indices[start..].contains(&col) {
                indices.push(col);
            }
        }
        indices[start..].sort_unstable();
        indptr.push(indices.len());
    }
    let data = vec![1.0f32; indices.len()];
    sprs::CsMat::new((rows, rows), indptr, indices, data)
}
