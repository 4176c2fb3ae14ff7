//! CUDA device tests (feature `cuda`). On a machine without a GPU they check that
//! discovery reports the missing device as an error, and (with NVRTC installed, as CI does)
//! that every kernel compiles; then `the_gpu_tests_pass_on_the_host_gpu` runs this binary
//! again with the host GPU (`tests/support/gpu_on_host.rs`) as its driver, so that the
//! GPU tests' assertions run on the CPU. `scripts/gpu-check.sh` runs them where a GPU is.
#![cfg(feature = "cuda")]

#[path = "support/gpu_on_host.rs"]
mod gpu_on_host;

#[path = "gpu/darray.rs"]
mod darray;

use std::time::Duration;

use tessera::{
    compile_all_kernels, compile_all_kernels_for, cuda_devices, DeviceActor, DeviceArray, DeviceError, Error,
    Gpu, Ref, Runtime, KERNELS,
};

/// Whether this machine should have a GPU (set by `scripts/gpu-check.sh`): then a missing
/// device is a failure, not a skip.
fn gpu_expected() -> bool {
    std::env::var("TESSERA_EXPECT_GPU").is_ok_and(|v| v == "1")
}

/// GPU 0, or `None` (a skip) where there is no GPU.
fn gpu() -> Option<Gpu> {
    or_skip(Gpu::open(0))
}

/// What opening GPU 0 gave, or `None` (a skip) if it failed because there is no GPU (a
/// failure with `TESSERA_EXPECT_GPU=1`, or for any other reason).
fn or_skip<T>(opened: Result<T, DeviceError>) -> Option<T> {
    match opened {
        Ok(opened) => Some(opened),
        Err(error) => {
            assert!(!gpu_expected(), "a GPU was expected: {error}");
            assert!(matches!(error, DeviceError::NoDevice(_)), "{error}");
            eprintln!("skipped: {error}");
            None
        }
    }
}

#[test]
fn discovery_reports_devices_or_a_clear_error() {
    match cuda_devices() {
        Ok(devices) => {
            assert!(!devices.is_empty());
            for d in devices {
                assert!(!d.name.is_empty() && d.total_memory > 0, "{d:?}");
            }
        }
        Err(DeviceError::NoDevice(reason)) => {
            assert!(!gpu_expected(), "a GPU was expected: {reason}");
            assert!(reason.contains("driver") || reason.contains("device"), "{reason}");
        }
        Err(other) => panic!("unexpected discovery error: {other}"),
    }
}

#[test]
fn every_kernel_compiles() {
    let nvrtc_expected = std::env::var("TESSERA_EXPECT_NVRTC").is_ok_and(|v| v == "1") || gpu_expected();
    // With TESSERA_EXPECT_NVRTC_RELEASE=13.0 (or 13, or 12.8), the PTX must come from an NVRTC
    // release starting so, so that a run meant for one CUDA version cannot pass on another's.
    let release = std::env::var("TESSERA_EXPECT_NVRTC_RELEASE").ok();
    match compile_all_kernels() {
        Ok(compiled) => {
            assert_eq!(compiled.len(), KERNELS.len());
            for (name, ptx) in compiled {
                let text = ptx.to_src();
                assert!(text.contains(&format!(".entry {name}")), "PTX of {name} lacks its entry point");
                if let Some(release) = &release {
                    let header = text.lines().find(|l| l.contains("Cuda compilation tools")).unwrap_or("");
                    let found = header.split("release ").nth(1).and_then(|r| r.split(',').next());
                    assert!(
                        found.is_some_and(
                            |found| found == release || found.starts_with(&format!("{release}."))
                        ),
                        "PTX of {name} is not from NVRTC {release}: {header:?}"
                    );
                }
            }
        }
        Err(DeviceError::MissingLibrary { library, .. }) if !nvrtc_expected => {
            eprintln!("skipped: {library} is not installed");
        }
        Err(error) => panic!("{error}"),
    }
}

#[test]
fn every_kernel_compiles_to_machine_code_for_hopper_and_ampere() {
    let nvrtc_expected = std::env::var("TESSERA_EXPECT_NVRTC").is_ok_and(|v| v == "1") || gpu_expected();
    // What `Gpu` loads on an H100/H200 (sm_90) and an A100 (sm_80): this also runs NVRTC's
    // assembler, which checks registers and shared memory against the architecture.
    for capability in [(9, 0), (8, 0)] {
        match compile_all_kernels_for(capability) {
            Ok(compiled) => {
                assert_eq!(compiled.len(), KERNELS.len());
                for (name, cubin) in compiled {
                    // An ELF image (CUBIN) that names the kernel's entry point.
                    assert_eq!(&cubin[..4], b"\x7fELF", "{name} for {capability:?} is not a CUBIN");
                    let entry = cubin.windows(name.len()).any(|w| w == name.as_bytes());
                    assert!(entry, "the CUBIN of {name} lacks its entry point");
                }
            }
            Err(DeviceError::MissingLibrary { library, .. }) if !nvrtc_expected => {
                eprintln!("skipped: {library} is not installed");
                return;
            }
            Err(error) => panic!("{capability:?}: {error}"),
        }
    }
    // An architecture NVRTC does not know is a compile error, not a panic.
    if let Err(error) = compile_all_kernels_for((1, 0)) {
        assert!(matches!(error, DeviceError::Compile { .. } | DeviceError::MissingLibrary { .. }), "{error}");
    } else {
        panic!("sm_10 compiled");
    }
}

#[test]
fn gemm_matches_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let (m, n, k) = (67, 45, 129);
    let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 8.0).collect();
    let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32 - 5.0) / 8.0).collect();
    let mut expected = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            expected[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
        }
    }
    let (da, db) = (gpu.upload(&a).unwrap(), gpu.upload(&b).unwrap());
    let mut dc = gpu.zeros(m * n).unwrap();
    gpu.sgemm((m, n, k), &da, &db, &mut dc).unwrap();
    let got = gpu.download(&dc).unwrap();
    for (g, e) in got.iter().zip(&expected) {
        assert!((g - e).abs() <= 1e-3 * (1.0 + e.abs()), "{g} vs {e}");
    }
    assert!(matches!(gpu.sgemm((m, n, k + 1), &da, &db, &mut dc), Err(DeviceError::Shape { .. })));
}

#[test]
fn kernels_compute_the_right_values() {
    let Some(gpu) = gpu() else { return };
    let x: Vec<f32> = (0..10_000).map(|i| (i % 7) as f32 - 3.0).collect();
    let mut dx = gpu.upload(&x).unwrap();
    gpu.relu(&mut dx).unwrap();
    let relu: Vec<f32> = x.iter().map(|v| v.max(0.0)).collect();
    assert_eq!(gpu.download(&dx).unwrap(), relu);
    let total = gpu.sum(&dx).unwrap();
    // Small integers: the sum is exact.
    assert_eq!(total, relu.iter().sum::<f32>());
    let mut dy = gpu.upload(&vec![1.0f32; x.len()]).unwrap();
    gpu.axpy(2.0, &dx, &mut dy).unwrap();
    assert_eq!(gpu.download(&dy).unwrap(), relu.iter().map(|v| 1.0 + 2.0 * v).collect::<Vec<_>>());
    let mut logits = gpu.upload(&[1.0, 2.0, 3.0, 0.0, 0.0, 0.0]).unwrap();
    gpu.softmax_rows(&mut logits, 2, 3).unwrap();
    let p = gpu.download(&logits).unwrap();
    assert!((p[..3].iter().sum::<f32>() - 1.0).abs() < 1e-6 && (p[3] - 1.0 / 3.0).abs() < 1e-6, "{p:?}");
}

/// A 2-D Poisson (5-point Laplacian) matrix on an `n × n` grid.
fn poisson(n: usize) -> sprs::CsMat<f32> {
    let mut triplets = sprs::TriMat::new((n * n, n * n));
    for i in 0..n {
        for j in 0..n {
            let row = i * n + j;
            triplets.add_triplet(row, row, 4.0);
            if i > 0 {
                triplets.add_triplet(row, row - n, -1.0);
            }
            if i + 1 < n {
                triplets.add_triplet(row, row + n, -1.0);
            }
            if j > 0 {
                triplets.add_triplet(row, row - 1, -1.0);
            }
            if j + 1 < n {
                triplets.add_triplet(row, row + 1, -1.0);
            }
        }
    }
    triplets.to_csr()
}

#[test]
fn spmv_matches_sprs_and_csr_round_trips() {
    let Some(gpu) = gpu() else { return };
    let a = poisson(64);
    let x: Vec<f32> = (0..a.cols()).map(|i| (i % 5) as f32 - 2.0).collect();
    let mut expected = vec![0f32; a.rows()];
    for (row, vec) in a.outer_iterator().enumerate() {
        expected[row] = vec.iter().map(|(col, v)| v * x[col]).sum();
    }
    let da = gpu.upload_csr(&a).unwrap();
    assert_eq!((da.shape(), da.nnz()), ((a.rows(), a.cols()), a.nnz()));
    let dx = gpu.upload(&x).unwrap();
    let mut dy = gpu.zeros(a.rows()).unwrap();
    gpu.spmv(&da, &dx, &mut dy).unwrap();
    assert_eq!(gpu.download(&dy).unwrap(), expected);
    assert_eq!(gpu.download_csr(&da).unwrap(), a);
    let mut short = gpu.zeros(3).unwrap();
    assert!(matches!(gpu.spmv(&da, &dx, &mut short), Err(DeviceError::Shape { .. })));
}

#[test]
fn queued_sparse_products_share_one_work_buffer() {
    let Some(gpu) = gpu() else { return };
    let (small, large) = (poisson(16), poisson(96));
    let product = |a: &sprs::CsMat<f32>, x: &[f32]| -> Vec<f32> {
        a.outer_iterator().map(|row| row.iter().map(|(col, v)| v * x[col]).sum()).collect()
    };
    // SpMVs and an SpMM on two matrices, queued back to back with no wait between them
    // (the work buffer grows for the larger ones and is reused by the rest), then read.
    let mut queued = Vec::new();
    for (round, a) in [&small, &large, &small, &large].into_iter().enumerate() {
        let x: Vec<f32> = (0..a.cols()).map(|i| ((i + round) % 7) as f32 - 3.0).collect();
        let da = gpu.upload_csr(a).unwrap();
        let dx = gpu.upload(&x).unwrap();
        let mut dy = gpu.zeros(a.rows()).unwrap();
        gpu.spmv(&da, &dx, &mut dy).unwrap();
        let mut dc = gpu.zeros(a.rows() * 2).unwrap();
        let b: Vec<f32> = x.iter().flat_map(|&v| [v, 2.0 * v]).collect();
        gpu.spmm(&da, &gpu.upload(&b).unwrap(), 2, &mut dc).unwrap();
        queued.push((product(a, &x), dy, dc, da));
    }
    for (expected, dy, dc, _) in queued {
        assert_eq!(gpu.download(&dy).unwrap(), expected);
        let c = gpu.download(&dc).unwrap();
        let doubled: Vec<f32> = expected.iter().flat_map(|&v| [v, 2.0 * v]).collect();
        assert_eq!(c, doubled);
    }
}

/// A TCP group of one rank (to hand NCCL's id to an NCCL group of one).
fn tcp_group_of_one() -> tessera::TcpGroup {
    let listener =
        tessera::GroupListener::bind(0, 1, [127, 0, 0, 1].into(), "s", Duration::from_secs(10)).unwrap();
    let addr = listener.addr();
    listener.connect(&[addr]).unwrap()
}

/// The host GPU's made streams catch what would race on a GPU, so that the tests relying
/// on them can fail: a stream's copy or collective reading memory the main stream wrote is
/// refused until the stream waited for an event recorded after the write, and main-stream
/// reads of a stream's results are stale until the main stream waited for it. (Host GPU
/// only: on a GPU these races have no certain outcome.)
#[test]
fn the_host_gpus_streams_catch_missing_waits() {
    use std::sync::Arc;
    use tessera::{GpuCommunicator, NcclGroup};
    if std::env::var_os(ON_HOST_GPU).is_none() {
        eprintln!("skipped: only the host GPU makes these races certain");
        return;
    }
    let Some(gpu) = gpu() else { return };
    let gpu = Arc::new(gpu);
    let main = gpu.main_stream().clone();
    let side = main.context().new_stream().unwrap();
    let source = gpu.upload(&[1.0, 2.0, 3.0]).unwrap();
    let mut copy = gpu.zeros(3).unwrap();
    // The side stream has not waited for the upload: its copy is refused.
    let refused = side.memcpy_dtod(&source, &mut copy).unwrap_err();
    assert!(format!("{refused:?}").contains("ILLEGAL_STATE"), "{refused:?}");
    side.wait(&main.record_event(None).unwrap()).unwrap();
    let queued = std::time::Instant::now();
    side.memcpy_dtod(&source, &mut copy).unwrap();
    // The main stream has not waited for the copy, which lags behind (20 ms, unless this
    // thread was held up for about as long): it reads zeros.
    let early = gpu.download(&copy).unwrap();
    if queued.elapsed() < Duration::from_millis(10) {
        assert_eq!(early, [0.0; 3], "the side stream did not lag");
    }
    main.wait(&side.record_event(None).unwrap()).unwrap();
    assert_eq!(gpu.download(&copy).unwrap(), [1.0, 2.0, 3.0]);
    // The same for an NCCL group's stream (after its first collective, which connects).
    let mut bootstrap = tcp_group_of_one();
    let mut nccl = NcclGroup::join(gpu.clone(), &mut bootstrap).unwrap();
    let mut first = gpu.upload(&[1.0]).unwrap();
    nccl.all_reduce_device(&mut first).unwrap();
    let mut data = gpu.upload(&[4.0, 5.0]).unwrap();
    let refused = nccl.all_reduce_on_group_stream(&mut data).unwrap_err().to_string();
    assert!(refused.contains("invalid usage"), "{refused}");
}

#[test]
fn nccl_with_one_rank_per_gpu() {
    use std::sync::Arc;
    use tessera::{Communicator, NcclGroup};
    let Some(gpu) = gpu() else { return };
    let mut bootstrap = tcp_group_of_one();
    let mut nccl = NcclGroup::join(Arc::new(gpu), &mut bootstrap).unwrap();
    let mut data: Vec<f32> = (0..1000).map(|i| i as f32).collect();
    let before = data.clone();
    nccl.all_reduce(&mut data).unwrap();
    assert_eq!(data, before, "one rank: the sum is the input");
    let mut gathered = vec![0f32; 1000];
    nccl.all_gather(&before, &mut gathered).unwrap();
    assert_eq!(gathered, before);
    nccl.broadcast(&mut data, 0).unwrap();
    nccl.barrier().unwrap();
}

#[test]
fn bf16_gemm_matches_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let (m, n, k) = (67, 45, 129);
    let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 8.0).collect();
    let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32 - 5.0) / 8.0).collect();
    // The inputs are exact in bf16 (multiples of 1/8 below 1), so only the output rounds.
    let (da, db) = (gpu.upload_bf16(&a).unwrap(), gpu.upload_bf16(&b).unwrap());
    assert_eq!(gpu.download_bf16(&da).unwrap(), a);
    let mut dc = gpu.zeros_bf16(m * n).unwrap();
    gpu.gemm_bf16((m, n, k), &da, &db, &mut dc).unwrap();
    let got = gpu.download_bf16(&dc).unwrap();
    for i in 0..m {
        for j in 0..n {
            let e: f32 = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            let g = got[i * n + j];
            assert!((g - e).abs() <= 1e-2 * (1.0 + e.abs()), "c[{i}][{j}] = {g}, expected {e}");
        }
    }
    assert!(matches!(gpu.gemm_bf16((m, n, k + 1), &da, &db, &mut dc), Err(DeviceError::Shape { .. })));
}

#[test]
fn spmm_matches_sprs() {
    let Some(gpu) = gpu() else { return };
    // A non-square matrix: the Poisson rows of a 12 × 12 grid, every third column dropped.
    let full = poisson(12);
    let mut triplets = sprs::TriMat::new((full.rows(), full.cols() / 3 + 1));
    for (row, vec) in full.outer_iterator().enumerate() {
        for (col, &v) in vec.iter() {
            if col % 3 == 0 {
                triplets.add_triplet(row, col / 3, v + col as f32 / 100.0);
            }
        }
    }
    let a: sprs::CsMat<f32> = triplets.to_csr();
    let n = 7;
    let b: Vec<f32> = (0..a.cols() * n).map(|i| ((i * 3 % 17) as f32 - 8.0) / 4.0).collect();
    let mut expected = vec![0f32; a.rows() * n];
    for (row, vec) in a.outer_iterator().enumerate() {
        for (col, &v) in vec.iter() {
            for j in 0..n {
                expected[row * n + j] += v * b[col * n + j];
            }
        }
    }
    let da = gpu.upload_csr(&a).unwrap();
    let db = gpu.upload(&b).unwrap();
    let mut dc = gpu.zeros(a.rows() * n).unwrap();
    gpu.spmm(&da, &db, n, &mut dc).unwrap();
    for (g, e) in gpu.download(&dc).unwrap().iter().zip(&expected) {
        assert!((g - e).abs() <= 1e-4 * (1.0 + e.abs()), "{g} vs {e}");
    }
    let mut short = gpu.zeros(a.rows() * n - 1).unwrap();
    assert!(matches!(gpu.spmm(&da, &db, n, &mut short), Err(DeviceError::Shape { .. })));
}

mod executor {
    use std::sync::Arc;

    use tessera::nn::{
        lenet, mlp, Activation, CpuExecutor, DType, Dataset, Evaluator, Executor, GpuDataset, GpuExecutor,
        GpuTrainer, Graph, Init, NnError, NodeId, OptimizerConfig, Params, Rng, TrainState, Trainer,
    };

    fn close(what: &str, got: &[f32], expected: &[f32]) {
        assert_eq!(got.len(), expected.len(), "{what}: lengths");
        for (i, (g, e)) in got.iter().zip(expected).enumerate() {
            assert!((g - e).abs() <= 1e-4 + 1e-3 * e.abs(), "{what}[{i}]: GPU {g}, CPU {e}");
        }
    }

    /// Runs forward and backward from `loss` on both executors with the same inputs, and
    /// compares every f32 value, every gradient that flows, and every parameter gradient.
    fn compare(graph: &Graph, loss: NodeId, training: bool, seed: u64) {
        let Some(gpu) = super::gpu() else { return };
        let mut rng = Rng::seed(seed);
        let params = Params::init(graph, &mut rng);
        let mut cpu = CpuExecutor::new(graph);
        let mut dev = GpuExecutor::new(Arc::new(gpu), graph).unwrap();
        // Every node's id, from the nodes that read it (and the loss itself).
        let mut ids: Vec<NodeId> = graph.nodes().iter().flat_map(|n| n.inputs.iter().copied()).collect();
        ids.push(loss);
        ids.sort();
        ids.dedup();
        for &id in &ids {
            let node = &graph.nodes()[id.index()];
            if !matches!(node.op, tessera::nn::Op::Input) {
                continue;
            }
            match node.dtype {
                DType::I32 => {
                    // Labels below the class count, embedding ids below the vocabulary.
                    let classes = graph.nodes().iter().find_map(|n| match n.op {
                        tessera::nn::Op::SoftmaxCrossEntropy if n.inputs[1] == id => {
                            Some(graph.nodes()[n.inputs[0].index()].shape[1])
                        }
                        tessera::nn::Op::Embedding if n.inputs[0] == id => {
                            Some(graph.nodes()[n.inputs[1].index()].shape[0])
                        }
                        tessera::nn::Op::SparseMatMul if n.inputs[0] == id => Some(n.shape[0]),
                        tessera::nn::Op::SparseMatMul if n.inputs[1] == id => {
                            Some(graph.nodes()[n.inputs[3].index()].shape[0])
                        }
                        _ => None,
                    });
                    let labels: Vec<i32> =
                        (0..node.len()).map(|k| (k * 7 % classes.unwrap_or(1)) as i32).collect();
                    cpu.set_ids(id, &labels).unwrap();
                    dev.set_ids(id, &labels).unwrap();
                }
                _ => {
                    let x: Vec<f32> = (0..node.len()).map(|_| rng.normal()).collect();
                    cpu.set_value(id, &x).unwrap();
                    dev.set_value(id, &x).unwrap();
                }
            }
        }
        for exec in [&mut cpu as &mut dyn Executor, &mut dev] {
            exec.set_training(training);
            exec.forward(&params, 0..loss.index() + 1).unwrap();
            exec.backward_from(&params, loss).unwrap();
        }
        assert_eq!(ids.len(), loss.index() + 1, "every node is compared");
        for &id in &ids {
            let node = &graph.nodes()[id.index()];
            let what = format!("node {} ({})", id.index(), node.name);
            if node.dtype == DType::F32 && !matches!(node.op, tessera::nn::Op::Param { .. }) {
                close(&format!("{what} value"), dev.value(id).unwrap(), cpu.value(id).unwrap());
            }
            if let Ok(expected) = cpu.grad(id) {
                close(&format!("{what} gradient"), dev.grad(id).unwrap(), expected);
            }
        }
        for (index, spec) in graph.params().iter().enumerate() {
            close(&format!("{} gradient", spec.name), dev.param_grad(index), cpu.param_grad(index));
        }
    }

    #[test]
    fn mlp_matches_the_cpu() {
        let model = mlp(8, &[12, 16, 5]).unwrap();
        compare(&model.graph, model.loss, true, 1);
    }

    #[test]
    fn lenet_matches_the_cpu_in_evaluation_mode() {
        let model = lenet(4, 8, 10).unwrap();
        compare(&model.graph, model.loss, false, 2);
    }

    /// Every other op the GPU executor runs: constant, matmul, broadcast add, sigmoid and
    /// tanh activations, softmax, reshape, a strided padded convolution with a fused tanh,
    /// overlapping max-pool windows, a linear layer with a fused sigmoid.
    #[test]
    fn every_op_matches_the_cpu() {
        let mut g = Graph::new();
        let x = g.input("x", &[2, 3, 7, 7], DType::F32);
        let w = g.param("w", &[4, 3, 3, 3], Init::Normal { std: 0.3 }).unwrap();
        let b = g.param("b", &[4], Init::Normal { std: 0.1 }).unwrap();
        let h = g.conv2d(x, w, b, 2, 1, Activation::Tanh).unwrap(); // [2, 4, 4, 4]
        let h = g.max_pool2d(h, 2, 1).unwrap(); // [2, 4, 3, 3]
        let h = g.reshape(h, &[2, 36]).unwrap();
        let c = g.constant(&[36], 0.25);
        let h = g.add(h, c).unwrap();
        let m = g.param("m", &[36, 6], Init::Normal { std: 0.2 }).unwrap();
        let h = g.matmul(h, m).unwrap();
        let bias = g.param("bias", &[6], Init::Normal { std: 0.2 }).unwrap();
        let h = g.add(h, bias).unwrap();
        let h = g.act(h, Activation::Sigmoid).unwrap();
        let h = g.softmax(h).unwrap();
        let w2 = g.param("w2", &[6, 5], Init::Normal { std: 0.5 }).unwrap();
        let b2 = g.param("b2", &[5], Init::Zeros).unwrap();
        let h = g.linear(h, w2, b2, Activation::Sigmoid).unwrap();
        let h = g.act(h, Activation::Tanh).unwrap();
        let h = g.dropout(h, 0.5).unwrap();
        let labels = g.input("labels", &[2], DType::I32);
        let loss = g.softmax_cross_entropy(h, labels).unwrap();
        compare(&g, loss, false, 3);
    }

    /// A batch of zero through every op that saves something for backward (convolution,
    /// max-pool, dropout in training, softmax cross-entropy) and softmax: empty values and
    /// gradients, a loss of 0 and zero parameter gradients, as on the CPU. The CPU half
    /// runs without a GPU too.
    #[test]
    fn a_batch_of_zero_matches_the_cpu() {
        let mut g = Graph::new();
        let x = g.input("x", &[0, 3, 7, 7], DType::F32);
        let w = g.param("w", &[4, 3, 3, 3], Init::Normal { std: 0.3 }).unwrap();
        let b = g.param("b", &[4], Init::Normal { std: 0.1 }).unwrap();
        let h = g.conv2d(x, w, b, 2, 1, Activation::Relu).unwrap(); // [0, 4, 4, 4]
        let h = g.max_pool2d(h, 2, 2).unwrap(); // [0, 4, 2, 2]
        let h = g.reshape(h, &[0, 16]).unwrap();
        let h = g.dropout(h, 0.5).unwrap();
        let s = g.softmax(h).unwrap();
        let w2 = g.param("w2", &[16, 5], Init::Normal { std: 0.5 }).unwrap();
        let b2 = g.param("b2", &[5], Init::Normal { std: 0.5 }).unwrap();
        let logits = g.linear(s, w2, b2, Activation::Identity).unwrap();
        let labels = g.input("labels", &[0], DType::I32);
        let loss = g.softmax_cross_entropy(logits, labels).unwrap();
        let params = Params::init(&g, &mut Rng::seed(4));
        let mut cpu = CpuExecutor::new(&g);
        cpu.set_training(true);
        cpu.set_value(x, &[]).unwrap();
        cpu.set_ids(labels, &[]).unwrap();
        cpu.forward_all(&params).unwrap();
        cpu.backward_from(&params, loss).unwrap();
        assert_eq!(cpu.value(loss).unwrap(), &[0.0]);
        assert!(cpu.value(s).unwrap().is_empty());
        for index in 0..g.params().len() {
            assert!(cpu.param_grad(index).iter().all(|&v| v == 0.0), "parameter {index}'s gradient");
        }
        compare(&g, loss, true, 5);
    }

    /// The sequence ops: embedding, layer norm, GELU, sub, mul, select-step, stack-steps,
    /// GRU cells (through the GRU layer) and MSE, forward and backward.
    #[test]
    fn sequence_ops_match_the_cpu() {
        let (b, t, vocab, e, h) = (3, 4, 11, 6, 5);
        let mut g = Graph::new();
        let ids = g.input("ids", &[b, t], DType::I32);
        let table = g.param("table", &[vocab, e], Init::Normal { std: 1.0 }).unwrap();
        let x = g.embedding(ids, table).unwrap(); // [B, T, E]
        let gamma = g.param("gamma", &[e], Init::Normal { std: 1.0 }).unwrap();
        let beta = g.param("beta", &[e], Init::Normal { std: 0.5 }).unwrap();
        let x = g.layer_norm(x, gamma, beta, 1e-5).unwrap();
        let x = g.gelu(x).unwrap();
        let scale = g.param("scale", &[b, t, e], Init::Normal { std: 1.0 }).unwrap();
        let x = g.mul(x, scale).unwrap();
        let shift = g.param("shift", &[b, t, e], Init::Normal { std: 1.0 }).unwrap();
        let x = g.sub(x, shift).unwrap();
        let gru = tessera::nn::Gru::new(&mut g, "gru", e, h).unwrap();
        let states = gru.forward(&mut g, x).unwrap(); // [B, T, H]
        let last = g.select_step(states, t - 1).unwrap();
        let target = g.input("target", &[b, h], DType::F32);
        let loss = g.mse(last, target).unwrap();
        compare(&g, loss, true, 6);
    }

    /// A sparse matrix in coordinate form (repeated coordinates included, learned values)
    /// times a learned dense one, forward and backward; out-of-range ids are refused.
    #[test]
    fn sparse_matmul_matches_the_cpu() {
        let mut g = Graph::new();
        let rows = g.input("rows", &[19], DType::I32);
        let cols = g.input("cols", &[19], DType::I32);
        let values = g.param("values", &[19], Init::Normal { std: 1.0 }).unwrap();
        let x = g.param("x", &[6, 4], Init::Normal { std: 1.0 }).unwrap();
        let y = g.sparse_matmul(rows, cols, values, x, 5).unwrap();
        let h = g.act(y, Activation::Tanh).unwrap();
        let target = g.input("target", &[5, 4], DType::F32);
        let loss = g.mse(h, target).unwrap();
        compare(&g, loss, true, 8);
        // The zoo's GCN: two propagations and the pick of the labelled nodes' logits.
        let model = tessera::nn::gcn(12, 30, 5, 7, 3, 4).unwrap();
        compare(&model.graph, model.loss, true, 9);
        let Some(gpu) = super::gpu() else { return };
        let mut dev = GpuExecutor::new(Arc::new(gpu), &g).unwrap();
        let mut ids = vec![0i32; 19];
        ids[3] = 6;
        assert!(matches!(
            dev.set_ids(cols, &ids),
            Err(tessera::nn::NnError::IdOutOfRange {
                op: "sparse_matmul cols",
                id: 6,
                position: 3,
                limit: 6
            })
        ));
        ids[3] = 5;
        assert!(matches!(
            dev.set_ids(rows, &ids),
            Err(tessera::nn::NnError::IdOutOfRange {
                op: "sparse_matmul rows",
                id: 5,
                position: 3,
                limit: 5
            })
        ));
    }

    /// Rows that add up by id do so in a fixed order, so that every run gives the same bits:
    /// the embedding gradient equals the CPU's bit for bit (the same additions in the same
    /// order), and the GCN's parameter gradients (through sparse products and their input
    /// gradients) are the same bits on every run. Many repeats of a few ids: where float
    /// atomics would add in an order that varies.
    #[test]
    fn rows_added_by_id_give_the_same_bits_every_run() {
        let Some(gpu) = super::gpu() else { return };
        let gpu = Arc::new(gpu);
        let (batch, steps, vocab, d) = (64, 32, 5, 24);
        let mut g = Graph::new();
        let ids = g.input("ids", &[batch, steps], DType::I32);
        let flat = g.reshape(ids, &[batch * steps]).unwrap();
        let table = g.param("table", &[vocab, d], Init::Normal { std: 1.0 }).unwrap();
        let y = g.embedding(flat, table).unwrap();
        let params = Params::init(&g, &mut Rng::seed(40));
        let idv: Vec<i32> = (0..batch * steps).map(|k| (k * 7 % 11 % vocab) as i32).collect();
        let mut rng = Rng::seed(41);
        let seed: Vec<f32> = (0..batch * steps * d).map(|_| rng.normal()).collect();
        let mut cpu = CpuExecutor::new(&g);
        cpu.set_ids(ids, &idv).unwrap();
        cpu.forward(&params, 0..y.index() + 1).unwrap();
        cpu.backward(&params, 0..y.index() + 1, &[(y, &seed)]).unwrap();
        let mut dev = GpuExecutor::new(gpu.clone(), &g).unwrap();
        dev.set_ids(ids, &idv).unwrap();
        for run in 0..3 {
            dev.forward(&params, 0..y.index() + 1).unwrap();
            dev.backward(&params, 0..y.index() + 1, &[(y, &seed)]).unwrap();
            assert_eq!(dev.param_grad(0), cpu.param_grad(0), "run {run}: the embedding gradient");
        }

        let (nodes, entries) = (300, 2_000);
        let model = tessera::nn::gcn(nodes, entries, 16, 32, 4, 50).unwrap();
        let params = Params::init(&model.graph, &mut Rng::seed(42));
        let mut rng = Rng::seed(43);
        let features: Vec<f32> = (0..nodes * 16).map(|_| rng.normal()).collect();
        // Most entries in a few rows and columns.
        let adjacency = tessera::nn::CooMatrix {
            rows: (0..entries).map(|e| (e * e % 13 * 7 % nodes) as i32).collect(),
            cols: (0..entries).map(|e| (e % 17 * 11 % nodes) as i32).collect(),
            values: (0..entries).map(|_| rng.normal()).collect(),
        };
        let labelled: Vec<i32> = (0..50).map(|k| k * 5).collect();
        let labels: Vec<i32> = (0..50).map(|k| k % 4).collect();
        let gradients = || {
            let mut dev = GpuExecutor::new(gpu.clone(), &model.graph).unwrap();
            model.bind(&mut dev, &features, &adjacency, &labelled, &labels).unwrap();
            dev.forward(&params, 0..model.loss.index() + 1).unwrap();
            dev.backward_from(&params, model.loss).unwrap();
            (0..params.tensors.len()).map(|i| dev.param_grad(i).to_vec()).collect::<Vec<_>>()
        };
        let first = gradients();
        assert!(first.iter().flatten().any(|&v| v != 0.0), "the gradients flow");
        for run in 1..3 {
            assert!(gradients() == first, "run {run}: the GCN's gradients differ from the first run's");
        }
    }

    /// The character GRU language model of the zoo, forward and backward.
    #[test]
    fn char_gru_matches_the_cpu() {
        let model = tessera::nn::char_gru(4, 6, 13, 8, 10).unwrap();
        compare(&model.graph, model.loss, true, 7);
    }

    #[test]
    fn dropout_masks_and_scales_on_the_gpu() {
        let Some(gpu) = super::gpu() else { return };
        let mut g = Graph::new();
        let x = g.input("x", &[100, 100], DType::F32);
        let s = g.param("s", &[100], Init::Ones).unwrap();
        let h = g.add(x, s).unwrap();
        let y = g.dropout(h, 0.25).unwrap();
        let params = Params::init(&g, &mut Rng::seed(0));
        let mut dev = GpuExecutor::new(Arc::new(gpu), &g).unwrap();
        dev.set_value(x, &[1.0; 10_000]).unwrap();
        dev.set_training(true);
        dev.set_seed(9);
        dev.forward_all(&params).unwrap();
        let out = dev.value(y).unwrap().to_vec();
        let dropped = out.iter().filter(|&&v| v == 0.0).count();
        assert!(
            out.iter().all(|&v| v == 0.0 || (v - 2.0 / 0.75).abs() < 1e-5),
            "values other than 0 and 2/(1-p)"
        );
        assert!((2_200..2_800).contains(&dropped), "{dropped} of 10000 dropped at p = 0.25");
        dev.backward(&params, 0..y.index() + 1, &[(y, &[1.0; 10_000])]).unwrap();
        let kept_per_column: Vec<f32> =
            (0..100).map(|j| (0..100).filter(|i| out[i * 100 + j] != 0.0).count() as f32 / 0.75).collect();
        close("dropout gradient", dev.param_grad(0), &kept_per_column);
        // The same seed gives the same mask; another seed another.
        dev.set_seed(9);
        dev.forward_all(&params).unwrap();
        assert_eq!(dev.value(y).unwrap(), out.as_slice());
        dev.set_seed(10);
        dev.forward_all(&params).unwrap();
        assert_ne!(dev.value(y).unwrap(), out.as_slice());
    }

    #[test]
    fn bad_labels_and_ids_are_errors() {
        let Some(gpu) = super::gpu() else { return };
        let gpu = Arc::new(gpu);
        let model = mlp(2, &[3, 4]).unwrap();
        let mut dev = GpuExecutor::new(gpu.clone(), &model.graph).unwrap();
        assert!(matches!(
            dev.set_ids(model.target, &[0, 4]),
            Err(tessera::nn::NnError::IdOutOfRange { id: 4, .. })
        ));
        let model = tessera::nn::char_gru(2, 3, 5, 4, 4).unwrap();
        let mut dev = GpuExecutor::new(gpu, &model.graph).unwrap();
        assert!(matches!(
            dev.set_ids(model.input, &[0, 1, 2, 3, 4, 5]),
            Err(tessera::nn::NnError::IdOutOfRange { op: "embedding", id: 5, position: 5, limit: 5 })
        ));
    }

    /// The digits data: from the working directory when it has it (`scripts/gpu-check.sh`
    /// runs this binary, built elsewhere, in a copy of the repository), else from the
    /// source tree.
    fn digits() -> Dataset {
        let local = std::path::Path::new("data/digits.csv");
        let source = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits.csv"));
        Dataset::digits(if local.exists() { local } else { source }).unwrap()
    }

    /// One optimizer step on the GPU gives the CPU's parameters (SGD with momentum, Adam,
    /// AdamW with weight decay).
    #[test]
    fn one_step_matches_the_cpu_trainer() {
        let Some(gpu) = super::gpu() else { return };
        let gpu = Arc::new(gpu);
        let data = digits();
        for config in
            [OptimizerConfig::sgd(0.1, 0.9), OptimizerConfig::adam(1e-2), OptimizerConfig::adamw(1e-2, 0.1)]
        {
            let model = mlp(32, &[64, 32, 10]).unwrap();
            let mut cpu_state = TrainState::new(&model, config.clone(), data.len(), 32, 5);
            let mut gpu_state = cpu_state.clone();
            let indices: Vec<usize> = (0..32).collect();
            let (mut x, mut y) = (vec![0f32; 32 * 64], vec![0i32; 32]);
            data.gather(&indices, &mut x, &mut y);
            let mut cpu = Trainer::new(model.clone());
            let mut dev = GpuTrainer::new(gpu.clone(), model.clone(), &gpu_state).unwrap();
            for _ in 0..3 {
                cpu.executor().set_value(model.input, &x).unwrap();
                cpu.executor().set_ids(model.target, &y).unwrap();
                let cpu_loss = cpu.step(&mut cpu_state).unwrap();
                dev.executor().set_value(model.input, &x).unwrap();
                dev.executor().set_ids(model.target, &y).unwrap();
                let gpu_loss = dev.step(&mut gpu_state).unwrap();
                assert!((cpu_loss - gpu_loss).abs() < 1e-4, "{config:?}: loss {gpu_loss} vs {cpu_loss}");
            }
            dev.sync_state(&mut gpu_state).unwrap();
            assert_eq!(
                (gpu_state.step, gpu_state.optimizer.steps),
                (cpu_state.step, cpu_state.optimizer.steps)
            );
            // Adam moves each parameter by about ±lr whatever the gradient's size, so an
            // element whose gradient is rounding noise on one device may move the other way
            // on the other: allow one element in a thousand to differ (SGD: none).
            let allowed = if matches!(config, OptimizerConfig::Sgd { .. }) {
                0
            } else {
                gpu_state.params.count() / 1000
            };
            let mut differ = 0;
            for (t, (g, c)) in gpu_state.params.tensors.iter().zip(&cpu_state.params.tensors).enumerate() {
                for (i, (g, c)) in g.data.iter().zip(&c.data).enumerate() {
                    if (g - c).abs() > 1e-4 + 1e-3 * c.abs() {
                        differ += 1;
                        eprintln!("{config:?}: parameter {t}[{i}]: GPU {g}, CPU {c}");
                    }
                }
            }
            assert!(differ <= allowed, "{config:?}: {differ} parameter elements differ (allowed {allowed})");
        }
    }

    #[test]
    fn a_state_or_data_set_that_does_not_fit_is_an_error() {
        let Some(gpu) = super::gpu() else { return };
        let gpu = Arc::new(gpu);
        let data = digits();
        let device_data = GpuDataset::upload(&gpu, &data, 10).unwrap();
        let model = mlp(32, &[64, 32, 10]).unwrap();
        let config = OptimizerConfig::adam(1e-3);
        // The device gathers rows by the loader's indices: a loader over more examples than
        // the data set has, or of another batch size, is refused before any launch.
        for (examples, batch) in [(data.len() + 5, 32), (data.len(), 16)] {
            let mut state = TrainState::new(&model, config.clone(), examples, batch, 1);
            let mut dev = GpuTrainer::new(gpu.clone(), model.clone(), &state).unwrap();
            let error = dev.train_epoch(&mut state, &device_data).unwrap_err();
            assert!(matches!(error, NnError::Argument { .. }), "{error}");
        }
        // Optimizer moments of another model's sizes.
        let mut state = TrainState::new(&model, config.clone(), data.len(), 32, 1);
        state.optimizer =
            TrainState::new(&mlp(32, &[64, 40, 10]).unwrap(), config, data.len(), 32, 1).optimizer;
        let error = GpuTrainer::new(gpu.clone(), model, &state).unwrap_err();
        assert!(matches!(error, NnError::Argument { .. }), "{error}");
        // The device still works.
        gpu.synchronize().unwrap();
    }

    /// Multi-head attention, causal and not, forward and backward (the score and mixing
    /// products as strided-batched cuBLAS calls over the heads).
    #[test]
    fn attention_matches_the_cpu() {
        for (case, (heads, causal)) in [(2, true), (4, false), (1, true)].into_iter().enumerate() {
            let mut g = Graph::new();
            let x = g.input("x", &[3, 7, 8], DType::F32);
            let wq = g.param("wq", &[8, 8], Init::Normal { std: 0.5 }).unwrap();
            let wk = g.param("wk", &[8, 8], Init::Normal { std: 0.5 }).unwrap();
            let wv = g.param("wv", &[8, 8], Init::Normal { std: 0.5 }).unwrap();
            let flat = g.reshape(x, &[21, 8]).unwrap();
            let project = |g: &mut Graph, w| {
                let p = g.matmul(flat, w).unwrap();
                g.reshape(p, &[3, 7, 8]).unwrap()
            };
            let (q, k, v) = (project(&mut g, wq), project(&mut g, wk), project(&mut g, wv));
            let y = g.attention(q, k, v, heads, causal).unwrap();
            let target = g.input("target", &[3, 7, 8], DType::F32);
            let loss = g.mse(y, target).unwrap();
            compare(&g, loss, true, 20 + case as u64);
        }
    }

    /// The zoo's transformer language model, forward and backward.
    #[test]
    fn tiny_transformer_matches_the_cpu() {
        let cfg = tessera::nn::TransformerConfig { width: 16, heads: 2, layers: 2, ff: 32 };
        let model = tessera::nn::tiny_transformer(3, 9, 13, cfg).unwrap();
        compare(&model.graph, model.loss, true, 8);
    }

    /// The character GRU trains on the GPU as on the CPU: from the same state, two epochs
    /// over the same windows give the same losses and parameters (to float rounding).
    #[test]
    fn char_gru_trains_on_the_gpu_as_on_the_cpu() {
        let Some(gpu) = super::gpu() else { return };
        let (batch, steps, vocab) = (8, 12, 9);
        let text: Vec<i32> = (0..2_000).map(|i: i32| (i * i + i / 7) % vocab as i32).collect();
        let model = tessera::nn::char_gru(batch, steps, vocab, 8, 16).unwrap();
        let windows = tessera::nn::window_count(text.len(), steps);
        let mut cpu_state = TrainState::new(&model, OptimizerConfig::adam(3e-3), windows, batch, 5);
        let mut gpu_state = cpu_state.clone();
        let mut cpu = Trainer::new(model.clone());
        let mut dev = GpuTrainer::new(Arc::new(gpu), model, &gpu_state).unwrap();
        for epoch in 0..2 {
            let c = cpu.train_epoch_text(&mut cpu_state, &text, steps).unwrap();
            let d = dev.train_epoch_text(&mut gpu_state, &text, steps).unwrap();
            assert_eq!(c.samples, d.samples, "epoch {epoch}");
            assert!(
                (c.loss - d.loss).abs() < 1e-3 * c.loss.abs().max(1.0),
                "epoch {epoch}: CPU {c:?}, GPU {d:?}"
            );
        }
        assert_eq!(cpu_state.step, gpu_state.step);
        for (i, (c, d)) in cpu_state.params.tensors.iter().zip(&gpu_state.params.tensors).enumerate() {
            close(&format!("parameter {i} after two epochs"), &d.data, &c.data);
        }
        // Ids outside the vocabulary (one in every window here) are an error, not a NaN on
        // the device.
        let bad: Vec<i32> =
            text.iter().enumerate().map(|(i, &c)| if i % 5 == 0 { vocab as i32 } else { c }).collect();
        let mut state = TrainState::new(dev.model(), OptimizerConfig::adam(3e-3), windows, batch, 5);
        let error = dev.train_epoch_text(&mut state, &bad, steps).unwrap_err();
        assert!(matches!(error, NnError::IdOutOfRange { .. }), "{error}");
    }

    /// The MLP and the CNN train on digits on the GPU to the accuracy the CPU reaches.
    #[test]
    fn mlp_and_cnn_train_on_digits() {
        let Some(gpu) = super::gpu() else { return };
        let gpu = Arc::new(gpu);
        let (train, test) = digits().split(0.2, 42);
        for (name, model, eval, epochs) in [
            ("mlp", mlp(32, &[64, 128, 64, 10]).unwrap(), mlp(test.len(), &[64, 128, 64, 10]).unwrap(), 15),
            ("cnn", lenet(32, 8, 10).unwrap(), lenet(test.len(), 8, 10).unwrap(), 10),
        ] {
            let config = OptimizerConfig::adam(3e-3);
            let mut cpu_state = TrainState::new(&model, config.clone(), train.len(), 32, 1);
            let mut gpu_state = cpu_state.clone();
            let mut cpu = Trainer::new(model.clone());
            let mut dev = GpuTrainer::new(gpu.clone(), model.clone(), &gpu_state).unwrap();
            let data = GpuDataset::upload(&gpu, &train, 10).unwrap();
            for _ in 0..epochs {
                cpu.train_epoch(&mut cpu_state, &train).unwrap();
                let stats = dev.train_epoch(&mut gpu_state, &data).unwrap();
                assert!(stats.loss.is_finite() && stats.samples > 0, "{stats:?}");
            }
            let mut evaluator = Evaluator::new(eval);
            let cpu_acc = evaluator.classify(&cpu_state.params, &test).unwrap().accuracy;
            let gpu_acc = evaluator.classify(&gpu_state.params, &test).unwrap().accuracy;
            eprintln!("{name}: test accuracy CPU {cpu_acc:.4}, GPU {gpu_acc:.4}");
            assert!(gpu_acc > 0.9, "{name}: GPU-trained accuracy {gpu_acc}");
            assert!((gpu_acc - cpu_acc).abs() < 0.03, "{name}: GPU {gpu_acc} vs CPU {cpu_acc}");
        }
    }

    /// Runs `replica(rank, group)` on each of `size` threads, each with its own handle on
    /// GPU 0 and its rank of a TCP group staged through host memory; returns their
    /// results in rank order.
    fn on_gpu_replicas<T: Send + 'static>(
        size: usize,
        replica: impl Fn(usize, Box<dyn tessera::GpuCommunicator>) -> T + Send + Copy + 'static,
    ) -> Vec<T> {
        on_gpus(size, false, replica)
    }

    /// As [`on_gpu_replicas`], or with `nccl`, rank r on GPU r in an NCCL group whose id
    /// travels over the TCP group.
    pub(super) fn on_gpus<T: Send + 'static>(
        size: usize,
        nccl: bool,
        replica: impl Fn(usize, Box<dyn tessera::GpuCommunicator>) -> T + Send + Copy + 'static,
    ) -> Vec<T> {
        use tessera::{GroupConfig, HostStagedGroup, NcclGroup, Rendezvous, TcpGroup};
        let _turn =
            nccl.then(|| super::NCCL_ON_SEVERAL_GPUS.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let meet = std::thread::spawn(move || {
            Rendezvous::serve(listener, size, "s", std::time::Duration::from_secs(30))
        });
        let ranks: Vec<_> = (0..size)
            .map(|rank| {
                std::thread::spawn(move || {
                    let gpu = Arc::new(tessera::Gpu::open(if nccl { rank } else { 0 }).unwrap());
                    let mut tcp = TcpGroup::join(GroupConfig::new(rank, size, addr, "s")).unwrap();
                    let group: Box<dyn tessera::GpuCommunicator> = if nccl {
                        Box::new(NcclGroup::join(gpu, &mut tcp).unwrap())
                    } else {
                        Box::new(HostStagedGroup::new(gpu, Box::new(tcp)))
                    };
                    replica(rank, group)
                })
            })
            .collect();
        let results = ranks.into_iter().map(|r| r.join().unwrap()).collect();
        meet.join().unwrap().unwrap();
        results
    }

    /// Two GPU replicas, each on its half of every batch with gradients averaged in small
    /// buckets, train as one GPU trainer on the whole batch does, and stay bit-identical
    /// to each other; classifier and language-model epochs alike.
    #[test]
    fn replicas_train_as_one_trainer_on_the_whole_batch() {
        let Some(gpu) = super::gpu() else { return };
        let gpu = Arc::new(gpu);
        let data = digits().subset(&(0..320).collect::<Vec<_>>());
        let config = OptimizerConfig::sgd(0.1, 0.9);
        // The whole batch of 32 on one trainer.
        let model = mlp(32, &[64, 32, 10]).unwrap();
        let mut alone = TrainState::new(&model, config.clone(), data.len(), 32, 9);
        let mut dev = GpuTrainer::new(gpu.clone(), model, &alone).unwrap();
        let device_data = GpuDataset::upload(&gpu, &data, 10).unwrap();
        let expected = dev.train_epoch(&mut alone, &device_data).unwrap();
        assert_eq!(dev.comm_stats(), tessera::nn::CommStats::default(), "a trainer alone has no group");
        // Two replicas of 16 rows each; buckets of about 4 KiB split the parameters.
        let replicas = on_gpu_replicas(2, move |rank, group| {
            let data = digits().subset(&(0..320).collect::<Vec<_>>());
            let model = mlp(16, &[64, 32, 10]).unwrap();
            let mut state = TrainState::new(&model, OptimizerConfig::sgd(0.1, 0.9), data.len(), 32, 9);
            // Every replica starts from rank 0's parameters.
            if rank == 1 {
                state.params.tensors[0].data.iter_mut().for_each(|v| *v += 1.0);
            }
            let mut replica = GpuTrainer::replica(group, model, &mut state, 4.0 / 1024.0).unwrap();
            assert_eq!((replica.rank(), replica.size()), (rank, 2));
            // A loader of the model's batch (not 2 × it) is refused before any collective.
            let mut wrong = state.clone();
            wrong.loader = tessera::nn::DataLoader::new(data.len(), 16, 9);
            let device_data = GpuDataset::upload(replica.executor().gpu(), &data, 10).unwrap();
            let error = replica.train_epoch(&mut wrong, &device_data).unwrap_err();
            assert!(error.to_string().contains("2 replicas"), "{error}");
            let stats = replica.train_epoch(&mut state, &device_data).unwrap();
            // Ten steps, timed on the GPU: the averaging went through the host group.
            let comm = replica.comm_stats();
            assert_eq!(comm.steps, 10, "{comm:?}");
            assert!(comm.compute_seconds > 0.0 && comm.reduce_seconds > 0.0, "{comm:?}");
            assert_eq!(comm.wait_seconds, comm.reduce_seconds, "{comm:?}");
            (stats, state)
        });
        let (stats0, state0) = &replicas[0];
        let (stats1, state1) = &replicas[1];
        assert_eq!(state0.params, state1.params, "replicas drifted apart");
        assert_eq!((stats0.samples, stats1.samples, expected.samples), (320, 320, 320));
        // The replicas' parameters round differently from the whole batch's (another order of
        // summing the gradient): a borderline example or two may be classified otherwise.
        assert!((stats0.loss - expected.loss).abs() < 1e-3 * expected.loss.abs().max(1.0));
        assert!((stats0.accuracy - expected.accuracy).abs() <= 2.0 / 320.0, "{stats0:?} vs {expected:?}");
        assert_eq!((stats0.loss, stats0.accuracy), (stats1.loss, stats1.accuracy));
        assert_eq!(state0.step, alone.step);
        for (i, (r, a)) in state0.params.tensors.iter().zip(&alone.params.tensors).enumerate() {
            close(&format!("parameter {i} after an epoch on two replicas"), &r.data, &a.data);
        }
        assert_ne!(state0.params, TrainState::new(dev.model(), config, 320, 32, 9).params, "nothing trained");

        // A character GRU over text: each replica takes half of every batch's windows.
        let (steps, vocab) = (12, 9);
        let text: Vec<i32> = (0..1_500).map(|i: i32| (i * i + i / 7) % vocab).collect();
        let windows = tessera::nn::window_count(text.len(), steps);
        let model = tessera::nn::char_gru(8, steps, vocab as usize, 8, 16).unwrap();
        let mut alone = TrainState::new(&model, OptimizerConfig::sgd(0.2, 0.9), windows, 8, 3);
        let mut dev = GpuTrainer::new(gpu.clone(), model, &alone).unwrap();
        let expected = dev.train_epoch_text(&mut alone, &text, steps).unwrap();
        let replicas = on_gpu_replicas(2, move |_, group| {
            let text: Vec<i32> = (0..1_500).map(|i: i32| (i * i + i / 7) % vocab).collect();
            let model = tessera::nn::char_gru(4, steps, vocab as usize, 8, 16).unwrap();
            let mut state = TrainState::new(&model, OptimizerConfig::sgd(0.2, 0.9), windows, 8, 3);
            let mut replica = GpuTrainer::replica(group, model, &mut state, 1.0).unwrap();
            let stats = replica.train_epoch_text(&mut state, &text, steps).unwrap();
            (stats, state)
        });
        assert_eq!(replicas[0].1.params, replicas[1].1.params, "text replicas drifted apart");
        assert_eq!(replicas[0].0.samples, expected.samples);
        assert!((replicas[0].0.loss - expected.loss).abs() < 1e-3 * expected.loss.abs().max(1.0));
        for (i, (r, a)) in replicas[0].1.params.tensors.iter().zip(&alone.params.tensors).enumerate() {
            close(&format!("GRU parameter {i} after an epoch on two replicas"), &r.data, &a.data);
        }
    }

    /// A replica in an NCCL group of one (NCCL holds one rank per GPU) trains as the
    /// trainer alone: the buckets go through NCCL on the device and come back whole.
    #[test]
    fn an_nccl_replica_of_one_trains_as_the_trainer_alone() {
        use tessera::NcclGroup;
        let Some(gpu) = super::gpu() else { return };
        let gpu = Arc::new(gpu);
        let data = digits().subset(&(0..256).collect::<Vec<_>>());
        let model = mlp(32, &[64, 32, 10]).unwrap();
        let config = OptimizerConfig::adam(1e-2);
        let mut alone = TrainState::new(&model, config.clone(), data.len(), 32, 4);
        let mut state = alone.clone();
        let device_data = GpuDataset::upload(&gpu, &data, 10).unwrap();
        let expected = GpuTrainer::new(gpu.clone(), model.clone(), &alone)
            .unwrap()
            .train_epoch(&mut alone, &device_data)
            .unwrap();
        let mut bootstrap = super::tcp_group_of_one();
        let nccl = NcclGroup::join(gpu.clone(), &mut bootstrap).unwrap();
        // Zero bucket sizes are refused.
        let mut unused = state.clone();
        let error = GpuTrainer::replica(Box::new(nccl), model.clone(), &mut unused, 0.0).unwrap_err();
        assert!(matches!(error, NnError::Argument { .. }), "{error}");
        let nccl = NcclGroup::join(gpu.clone(), &mut bootstrap).unwrap();
        let mut replica = GpuTrainer::replica(Box::new(nccl), model, &mut state, 1e-3).unwrap();
        let stats = replica.train_epoch(&mut state, &device_data).unwrap();
        assert_eq!((stats.samples, state.step), (expected.samples, alone.step));
        let comm = replica.comm_stats();
        assert_eq!(comm.steps, 8, "{comm:?}");
        assert!(comm.compute_seconds > 0.0 && comm.reduce_seconds > 0.0, "{comm:?}");
        // A single step also reads its times (the loss it returns waited for it).
        replica.step(&mut state).unwrap();
        assert_eq!(replica.comm_stats().steps, 9);
        assert!((stats.loss - expected.loss).abs() <= 1e-6 * expected.loss.abs().max(1.0), "{stats:?}");
        for (i, (r, a)) in state.params.tensors.iter().zip(&alone.params.tensors).enumerate() {
            close(&format!("parameter {i}"), &r.data, &a.data);
        }
    }
}

/// The device actor of GPU 0 for `rt`, or `None` (a skip) where there is no GPU.
fn device_actor(rt: &Runtime) -> Option<DeviceActor> {
    or_skip(DeviceActor::get(rt, 0))
}

#[test]
fn a_device_actor_for_a_missing_device_is_a_clear_error() {
    let rt = Runtime::builder().workers(1).build().unwrap();
    // No GPU: device 0 is missing; with GPUs: device 4096 is.
    let ordinal = if cuda_devices().is_ok() { 4096 } else { 0 };
    match DeviceActor::get(&rt, ordinal) {
        Err(DeviceError::NoDevice(reason)) => assert!(!reason.is_empty()),
        other => panic!("expected NoDevice, got {other:?}"),
    }
    rt.shutdown();
}

#[test]
fn a_device_array_encodes_as_its_host_copy() {
    let array = DeviceArray::from_host(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], vec![2, 3]).unwrap();
    assert_eq!(array.device(), None);
    let bytes = bincode::serde::encode_to_vec(&array, bincode::config::standard()).unwrap();
    let (back, _): (DeviceArray, usize) =
        bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).unwrap();
    assert_eq!((back.shape(), back.to_host().unwrap()), (&[2, 3][..], array.to_host().unwrap()));
    assert!(matches!(DeviceArray::from_host(vec![1.0; 5], vec![2, 3]), Err(DeviceError::Shape { .. })));
}

#[test]
fn one_device_actor_per_gpu_and_runtime() {
    let rt = Runtime::builder().workers(1).build().unwrap();
    let Some(actor) = device_actor(&rt) else { return };
    let again = DeviceActor::get(&rt, 0).unwrap();
    assert!(std::sync::Arc::ptr_eq(actor.gpu(), again.gpu()));
    rt.shutdown();
}

#[test]
fn work_on_the_device_gets_its_inputs_without_a_copy() {
    let rt = Runtime::builder().workers(2).build().unwrap();
    let Some(actor) = device_actor(&rt) else { return };
    let x: Ref<DeviceArray> = actor.upload(vec![1.0, -2.0, 3.0, -4.0], vec![2, 2]);
    // The handle a reader gets is the device buffer itself.
    let x_handle = x.blocking_get().unwrap();
    assert_eq!(x_handle.device(), Some(0));
    assert!(x_handle.same_buffer(&x.blocking_get().unwrap()), "get() made a copy");
    let expected_input = x_handle.clone();
    let y = actor.run(std::slice::from_ref(&x), move |scope, inputs| {
        assert!(inputs[0].same_buffer(&expected_input), "the input was copied");
        let mut out = scope.gpu().zeros(inputs[0].len())?;
        scope.gpu().copy(inputs[0].slice().expect("on the device"), &mut out)?;
        scope.gpu().relu(&mut out)?;
        scope.array(out, inputs[0].shape().to_vec())
    });
    let z = actor.run(&[y.clone(), x.clone()], |scope, inputs| {
        let mut out = scope.gpu().zeros(inputs[0].len())?;
        scope.gpu().copy(inputs[0].slice().expect("on the device"), &mut out)?;
        scope.gpu().axpy(1.0, inputs[1].slice().expect("on the device"), &mut out)?;
        scope.array(out, vec![4])
    });
    let z_array = z.blocking_get_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(z_array.device(), Some(0));
    assert_eq!(z_array.to_host().unwrap(), vec![2.0, -2.0, 6.0, -4.0]);
    assert_eq!(y.blocking_get().unwrap().to_host().unwrap(), vec![1.0, 0.0, 3.0, 0.0]);
    assert_eq!(actor.copies_in(), 0, "inputs on the device were copied");
    rt.shutdown();
}

#[test]
fn an_input_on_another_device_is_copied_device_to_device() {
    let rt = Runtime::builder().workers(2).build().unwrap();
    let Some(first) = device_actor(&rt) else { return };
    let Ok(second) = DeviceActor::get(&rt, 1) else {
        eprintln!("skipped: one GPU");
        return;
    };
    let data: Vec<f32> = (0..100_000).map(|i| i as f32 * 0.5 - 7.0).collect();
    let on_second = second.upload(data.clone(), vec![250, 400]);
    on_second.blocking_get_timeout(Duration::from_secs(30)).unwrap();
    let (copies_before, second_live) = (first.copies_in(), second.live_bytes());
    let peer_before = host_gpu_peer_copies();
    let copied = first.run(std::slice::from_ref(&on_second), |scope, inputs| {
        let mut out = scope.gpu().zeros(inputs[0].len())?;
        scope.gpu().copy(inputs[0].slice().expect("on the device"), &mut out)?;
        scope.array(out, inputs[0].shape().to_vec())
    });
    // The source goes at once: its memory may be reused only after the copy read it.
    drop(on_second);
    let copied = copied.blocking_get_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(copied.device(), Some(0));
    assert_eq!(copied.shape(), &[250, 400]);
    assert_eq!(copied.to_host().unwrap(), data);
    assert_eq!(first.copies_in(), copies_before + 1);
    if let (Some(before), Some(after)) = (peer_before, host_gpu_peer_copies()) {
        assert_eq!(after - before, 1, "the array went through the host");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while second.live_bytes() + 400_000 != second_live && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(second.live_bytes() + 400_000, second_live, "the source was not freed");
    rt.shutdown();
}

#[test]
fn host_inputs_are_uploaded_once_and_failures_propagate() {
    let rt = Runtime::builder().workers(2).build().unwrap();
    let Some(actor) = device_actor(&rt) else { return };
    let before = actor.copies_in();
    let staged = rt.put(DeviceArray::from_host(vec![1.0, 2.0], vec![2]).unwrap());
    let y = actor.run(&[staged], |_scope, inputs| Ok(inputs[0].clone()));
    let y_array = y.blocking_get_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!((y_array.device(), y_array.to_host().unwrap()), (Some(0), vec![1.0, 2.0]));
    assert_eq!(actor.copies_in(), before + 1);

    let failing =
        actor.run(&[], |_scope, _| Err(DeviceError::Shape { op: "test", message: "deliberate".into() }));
    let after = actor.run(std::slice::from_ref(&failing), |_scope, inputs| Ok(inputs[0].clone()));
    assert!(matches!(failing.blocking_get(), Err(Error::TaskFailed { .. })));
    match after.blocking_get_timeout(Duration::from_secs(30)) {
        Err(Error::DependencyFailed { cause, .. }) => {
            assert!(cause.to_string().contains("deliberate"), "{cause}")
        }
        other => panic!("expected DependencyFailed, got {other:?}"),
    }
    let panicked = actor.run(&[], |_scope, _| panic!("deliberate panic"));
    assert!(matches!(panicked.blocking_get(), Err(Error::TaskPanicked { .. })));
    // The actor still works after a failure and a panic.
    let ok = actor.upload(vec![5.0], vec![1]);
    assert_eq!(ok.blocking_get().unwrap().to_host().unwrap(), vec![5.0]);
    // A `Ref` of another runtime is waited for and read in that runtime's table.
    let other_rt = Runtime::builder().workers(1).build().unwrap();
    let theirs = other_rt.put(DeviceArray::from_host(vec![7.0, 8.0, 9.0], vec![3]).unwrap());
    let ours = actor.run(&[theirs], |_scope, inputs| Ok(inputs[0].clone()));
    let ours = ours.blocking_get_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!((ours.device(), ours.to_host().unwrap()), (Some(0), vec![7.0, 8.0, 9.0]));
    other_rt.shutdown();
    rt.shutdown();
}

#[test]
fn device_memory_is_freed_when_the_last_handle_drops() {
    let rt = Runtime::builder().workers(1).build().unwrap();
    let Some(actor) = device_actor(&rt) else { return };
    const LEN: usize = 64 << 20; // 256 MiB of f32
    let live_before = actor.live_bytes();
    let (free_before, _) = actor.gpu().memory_info().unwrap();
    let x = actor.run(&[], |scope, _| scope.zeros(vec![LEN]));
    let handle = x.blocking_get_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(actor.live_bytes(), live_before + LEN * 4);
    actor.gpu().synchronize().unwrap();
    let (free_held, _) = actor.gpu().memory_info().unwrap();
    drop(x);
    // A handle read from the Ref keeps the buffer alive.
    assert_eq!(actor.live_bytes(), live_before + LEN * 4);
    drop(handle);
    assert_eq!(actor.live_bytes(), live_before);
    actor.gpu().synchronize().unwrap();
    let (free_after, _) = actor.gpu().memory_info().unwrap();
    eprintln!("free device memory: {free_before} before, {free_held} held, {free_after} after the drop");
    // The stream-ordered pool gives memory back at synchronization (release threshold 0).
    assert!(free_after >= free_held + LEN * 2, "{free_held} -> {free_after}: the buffer was not freed");
    rt.shutdown();
}

#[test]
fn device_memory_dropped_on_a_thread_without_a_context_is_freed() {
    let rt = Runtime::builder().workers(1).build().unwrap();
    let Some(actor) = device_actor(&rt) else { return };
    const LEN: usize = 64 << 20; // 256 MiB of f32
    let live_before = actor.live_bytes();
    let x = actor.run(&[], |scope, _| scope.zeros(vec![LEN]));
    let handle = x.blocking_get_timeout(Duration::from_secs(30)).unwrap();
    drop(x);
    actor.gpu().synchronize().unwrap();
    let (free_held, _) = actor.gpu().memory_info().unwrap();
    // A fresh thread has no CUDA context current: the last handle drops there.
    std::thread::spawn(move || drop(handle)).join().unwrap();
    assert_eq!(actor.live_bytes(), live_before);
    // A free that failed there would be reported by the device's next operation.
    actor.gpu().synchronize().expect("the drop on another thread left an error behind");
    let (free_after, _) = actor.gpu().memory_info().unwrap();
    assert!(free_after >= free_held + LEN * 2, "{free_held} -> {free_after}: the buffer was not freed");

    // The same for a sparse matrix and for a whole `Gpu` (its cuBLAS handle and buffers).
    let gpu = actor.gpu();
    let csr = gpu.upload_csr(&poisson(2048)).unwrap(); // 4·10⁶ rows, ~100 MB
    gpu.synchronize().unwrap();
    let (free_held, _) = gpu.memory_info().unwrap();
    std::thread::spawn(move || drop(csr)).join().unwrap();
    gpu.synchronize().expect("the drop on another thread left an error behind");
    let (free_after, _) = gpu.memory_info().unwrap();
    assert!(free_after >= free_held + (50 << 20), "{free_held} -> {free_after}: the matrix was not freed");
    let other = Gpu::open(0).unwrap();
    let (a, b) = (other.upload(&[1.0; 64 * 64]).unwrap(), other.upload(&[1.0; 64 * 64]).unwrap());
    let mut c = other.zeros(64 * 64).unwrap();
    other.sgemm((64, 64, 64), &a, &b, &mut c).unwrap();
    assert_eq!(other.download(&c).unwrap()[0], 64.0);
    // Bare `CudaSlice`s are cudarc's: they drop where the device was last used.
    drop((a, b, c));
    std::thread::spawn(move || drop(other)).join().unwrap();
    gpu.synchronize().expect("dropping a Gpu on another thread left an error behind");
    rt.shutdown();
}

/// `tessera bench cuda --small` runs every part of the suite and reports each figure (on
/// the host GPU too: this checks the suite's code, its figures mean nothing there).
#[test]
fn the_cuda_bench_runs_at_small_sizes() {
    if gpu().is_none() {
        return;
    }
    // The GPU machine runs this binary from gpu-carry/, beside the `tessera` it was built with.
    let built = std::path::Path::new(env!("CARGO_BIN_EXE_tessera"));
    let tessera = if built.exists() { built } else { std::path::Path::new("gpu-carry/tessera") };
    let output = std::process::Command::new(tessera)
        .args(["bench", "cuda", "--small", "--json"])
        .output()
        .expect("running tessera bench cuda");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{}: {stderr}", output.status);
    let figures: Vec<(String, f64)> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| {
            let row: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
            (row["bench"].as_str().expect("a name").to_string(), row["value"].as_f64().expect("a value"))
        })
        .collect();
    let names: Vec<&str> = figures.iter().map(|(name, _)| name.as_str()).collect();
    let expected = [
        "copy_bandwidth",
        "gemm_f32_128",
        "gemm_bf16_128",
        "darray_matmul_f32_128_tiles4x4",
        "spmv_poisson",
        "spmv_random_nnz10",
        "train_mlp_digits",
        "train_cnn_digits",
        "train_cnn_digits_nccl1",
        "train_char_gru_tokens",
        "train_tiny_transformer_tokens",
    ]
    .map(|name| format!("cuda-small/{name}"));
    assert_eq!(names, expected, "{stderr}");
    for (name, value) in &figures {
        assert!(value.is_finite() && *value > 0.0, "{name} = {value}");
    }
}

/// How many GPUs this machine has (0 without any).
fn gpu_count() -> usize {
    cuda_devices().map_or(0, |devices| devices.len())
}

/// NCCL across two GPUs, one rank each (on machines with two or more): sums, broadcasts
/// from either root, gathers, uneven reduce-scatters and a barrier give every rank the
/// right values, on the host and on the device.
#[test]
fn nccl_collectives_across_two_gpus() {
    if gpu_count() < 2 {
        eprintln!("skipped: fewer than two GPUs");
        return;
    }
    let results = executor::on_gpus(2, true, |rank, mut group| {
        let r = rank as f32;
        let mut sum: Vec<f32> = (0..1000).map(|i| i as f32 + r).collect();
        group.all_reduce(&mut sum).unwrap();
        assert!(
            sum.iter().enumerate().all(|(i, &v)| v == 2.0 * i as f32 + 1.0),
            "rank {rank}: {:?}",
            &sum[..4]
        );
        for root in 0..2 {
            let mut data = vec![10.0 * r + 1.0; 7];
            group.broadcast(&mut data, root).unwrap();
            assert_eq!(data, vec![10.0 * root as f32 + 1.0; 7], "rank {rank}, root {root}");
        }
        let mut gathered = vec![0.0; 6];
        group.all_gather(&[r, r + 0.5, r + 0.25], &mut gathered).unwrap();
        assert_eq!(gathered, [0.0, 0.5, 0.25, 1.0, 1.5, 1.25]);
        // Five elements over two ranks: segments of two and three (`tessera::segment`).
        let mut data = [1.0 + r, 2.0, 3.0, 4.0, 5.0 * (r + 1.0)];
        let mut mine = vec![0.0; tessera::segment(5, 2, rank).len()];
        group.reduce_scatter(&mut data, &mut mine).unwrap();
        assert_eq!(mine, if rank == 0 { vec![3.0, 4.0] } else { vec![6.0, 8.0, 15.0] });
        group.barrier().unwrap();
        let gpu = group.gpu().clone();
        let mut device = gpu.upload(&[r + 1.0; 5]).unwrap();
        group.all_reduce_device(&mut device).unwrap();
        gpu.download(&device).unwrap()
    });
    assert_eq!(results, vec![vec![3.0; 5]; 2]);
}

/// Two replicas on two GPUs averaging through NCCL (on NCCL's stream, during backward)
/// train as the HostStaged replicas on one GPU do (after backward), bit for bit (the same
/// sums), and stay equal to each other. On the host GPU, NCCL's stream lags behind the main
/// one, so a missing wait between the two shows here as drifted or different parameters.
#[test]
fn nccl_replicas_on_two_gpus_train_as_host_staged_replicas() {
    use tessera::nn::{mlp, Dataset, GpuDataset, GpuTrainer, OptimizerConfig, TrainState};
    if gpu_count() < 2 {
        eprintln!("skipped: fewer than two GPUs");
        return;
    }
    let train = |nccl: bool| {
        executor::on_gpus(2, nccl, |_, group| {
            let path = concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits.csv");
            let data = Dataset::digits(path).unwrap().subset(&(0..256).collect::<Vec<_>>());
            let model = mlp(16, &[64, 32, 10]).unwrap();
            let mut state = TrainState::new(&model, OptimizerConfig::adam(1e-2), data.len(), 32, 5);
            let mut replica = GpuTrainer::replica(group, model, &mut state, 1.0 / 1024.0).unwrap();
            let device_data = GpuDataset::upload(replica.executor().gpu(), &data, 10).unwrap();
            for _ in 0..2 {
                replica.train_epoch(&mut state, &device_data).unwrap();
            }
            (state.params, replica.comm_stats())
        })
    };
    let (staged, nccl) = (train(false), train(true));
    assert_eq!(nccl[0].0, nccl[1].0, "NCCL replicas drifted apart");
    // Sums of two values are the same in any order: the same bits either way.
    assert_eq!(nccl[0].0, staged[0].0, "NCCL and host-staged averaging differ");
    // Both timed their 16 steps on the GPU: the host-staged group averaged after backward
    // (all of it waited for), NCCL on its own stream bucket by bucket during backward.
    for ((_, staged), (_, nccl)) in staged.iter().zip(&nccl) {
        assert_eq!((staged.steps, nccl.steps), (16, 16), "{staged:?} {nccl:?}");
        assert_eq!(staged.wait_seconds, staged.reduce_seconds, "{staged:?}");
        assert!(nccl.compute_seconds > 0.0 && nccl.reduce_seconds > 0.0, "{nccl:?}");
    }

    // A character GRU: its cell's parameters are read at every time step, so a bucket is
    // complete only after the first step's backward (the last in the walk); reduced any
    // earlier, the replicas would train on partial gradients.
    let train_text = |nccl: bool| {
        executor::on_gpus(2, nccl, |_, group| {
            let (steps, vocab) = (12, 9);
            let text: Vec<i32> = (0..1_500).map(|i: i32| (i * i + i / 7) % vocab).collect();
            let windows = tessera::nn::window_count(text.len(), steps);
            let model = tessera::nn::char_gru(4, steps, vocab as usize, 8, 16).unwrap();
            let mut state = TrainState::new(&model, OptimizerConfig::sgd(0.2, 0.9), windows, 8, 3);
            let mut replica = GpuTrainer::replica(group, model, &mut state, 1.0 / 1024.0).unwrap();
            replica.train_epoch_text(&mut state, &text, steps).unwrap();
            state.params
        })
    };
    let (staged, nccl) = (train_text(false), train_text(true));
    assert_eq!(nccl[0], nccl[1], "NCCL GRU replicas drifted apart");
    // (Embedding gradients add up with float atomics on a GPU: close, not bit-equal.)
    for (i, (n, h)) in nccl[0].tensors.iter().zip(&staged[0].tensors).enumerate() {
        for (k, (a, b)) in n.data.iter().zip(&h.data).enumerate() {
            assert!((a - b).abs() <= 1e-5 + 1e-4 * b.abs(), "GRU parameter {i}[{k}]: NCCL {a}, staged {b}");
        }
    }
}

/// Held by each test whose NCCL ranks span several GPUs: two NCCL groups queued on the same
/// devices' streams at once may wait on each other's collectives, so these tests take turns.
static NCCL_ON_SEVERAL_GPUS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `rank(r, gpu r, bootstrap)` for r in 0..2 on threads of their own, with a TCP
/// group of two as the bootstrap, and returns what each returned (two GPUs needed).
fn on_two_gpus<T: Send + 'static>(
    rank: impl Fn(usize, std::sync::Arc<Gpu>, tessera::TcpGroup) -> T + Send + Copy + 'static,
) -> Vec<T> {
    use tessera::{GroupConfig, Rendezvous, TcpGroup};
    let _turn = NCCL_ON_SEVERAL_GPUS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let meet = std::thread::spawn(move || Rendezvous::serve(listener, 2, "s", Duration::from_secs(30)));
    let ranks: Vec<_> = (0..2)
        .map(|r| {
            std::thread::spawn(move || {
                let gpu = std::sync::Arc::new(Gpu::open(r).unwrap());
                let tcp = TcpGroup::join(GroupConfig::new(r, 2, addr, "s")).unwrap();
                rank(r, gpu, tcp)
            })
        })
        .collect();
    let results = ranks.into_iter().map(|r| r.join().unwrap()).collect();
    meet.join().unwrap().unwrap();
    results
}

/// Checks how a collective abandoned by its peer failed: after the group's timeout, while
/// the collective ran on the GPU, or (a real NCCL may notice the peer's closed connections
/// first) earlier, on NCCL's report.
fn check_abandoned(message: &str, waited: Duration, timeout: Duration) {
    assert!(message.contains("rank 0 of 2"), "{message}");
    assert!(waited < timeout + Duration::from_secs(5), "failed after {waited:?}: {message}");
    if !message.contains("NCCL reported") {
        assert!(message.contains("ran on the GPU") && message.contains(&format!("{timeout:?}")), "{message}");
        assert!(waited >= timeout, "failed after {waited:?}: {message}");
    }
}

/// An NCCL group's watchdog: a slow rank is waited for, but when a rank stops calling the
/// group's collectives, the next one fails on the other rank within the group's timeout
/// (NCCL alone waits forever), every later one fails at once with the same reason, the
/// failure counts as a lost peer, and dropping the group does not wait.
#[test]
fn an_nccl_collective_that_a_rank_never_joins_fails_within_the_timeout() {
    use tessera::{CollectiveError, Communicator, NcclGroup};
    if gpu_count() < 2 {
        eprintln!("skipped: fewer than two GPUs");
        return;
    }
    const TIMEOUT: Duration = Duration::from_secs(3);
    let results = on_two_gpus(|rank, gpu, mut tcp| {
        let mut group = NcclGroup::join_within(gpu.clone(), &mut tcp, TIMEOUT).unwrap();
        // Rank 1 comes half a second late: well within the timeout.
        if rank == 1 {
            std::thread::sleep(Duration::from_millis(500));
        }
        let mut data = [rank as f32 + 1.0; 4];
        group.all_reduce(&mut data).unwrap();
        assert_eq!(data, [3.0; 4], "rank {rank}");
        assert!(group.failure().is_none(), "rank {rank}: {:?}", group.failure());
        if rank == 1 {
            // Rank 1 leaves the group: its communicator is closed, as a dead rank's would be.
            drop(group);
            return None;
        }
        let started = std::time::Instant::now();
        let error = group.all_reduce(&mut data).unwrap_err();
        let waited = started.elapsed();
        let later = std::time::Instant::now();
        let mut device = gpu.upload(&[1.0; 4]).unwrap();
        let again = group.all_reduce_device(&mut device).unwrap_err();
        let again_after = later.elapsed();
        let failure = group.failure();
        let dropping = std::time::Instant::now();
        drop(group);
        Some((error, waited, again, again_after, failure, dropping.elapsed()))
    });
    let Some((error, waited, again, again_after, failure, dropped_after)) =
        results.into_iter().next().unwrap()
    else {
        panic!("rank 0 returned nothing")
    };
    assert!(matches!(error, CollectiveError::Aborted { op: "all_reduce", .. }), "{error}");
    let message = error.to_string();
    check_abandoned(&message, waited, TIMEOUT);
    assert_eq!(again.to_string(), message, "a later collective fails with the same reason");
    assert!(again_after < Duration::from_secs(1), "the later collective took {again_after:?}");
    assert_eq!(failure.map(|f| f.to_string()), Some(message.clone()));
    assert!(tessera::nn::is_peer_lost(&error.into()), "{message}");
    assert!(dropped_after < Duration::from_secs(1), "dropping the group took {dropped_after:?}");
}

/// A bootstrap group that fails right after the broadcast that hands out NCCL's unique id:
/// a rank that received the id but never joined NCCL.
struct FailsAfterTheId(tessera::TcpGroup);

impl tessera::Communicator for FailsAfterTheId {
    fn rank(&self) -> usize {
        self.0.rank()
    }
    fn size(&self) -> usize {
        self.0.size()
    }
    fn all_reduce(&mut self, data: &mut [f32]) -> Result<(), tessera::CollectiveError> {
        self.0.all_reduce(data)
    }
    fn broadcast(&mut self, data: &mut [f32], root: usize) -> Result<(), tessera::CollectiveError> {
        self.0.broadcast(data, root)?;
        Err(tessera::CollectiveError::Setup("this rank fails after receiving the id".into()))
    }
    fn all_gather(&mut self, local: &[f32], out: &mut [f32]) -> Result<(), tessera::CollectiveError> {
        self.0.all_gather(local, out)
    }
    fn reduce_scatter(&mut self, data: &mut [f32], out: &mut [f32]) -> Result<(), tessera::CollectiveError> {
        self.0.reduce_scatter(data, out)
    }
    fn barrier(&mut self) -> Result<(), tessera::CollectiveError> {
        self.0.barrier()
    }
}

/// NCCL's setup fails within the timeout on a rank whose peer received the id and never
/// joined NCCL (NCCL alone waits forever).
#[test]
fn nccl_setup_that_a_rank_never_joins_fails_within_the_timeout() {
    use tessera::{CollectiveError, NcclGroup};
    if gpu_count() < 2 {
        eprintln!("skipped: fewer than two GPUs");
        return;
    }
    const TIMEOUT: Duration = Duration::from_secs(2);
    let results = on_two_gpus(|rank, gpu, tcp| {
        let started = std::time::Instant::now();
        let joined = if rank == 0 {
            NcclGroup::join_within(gpu, &mut { tcp }, TIMEOUT)
        } else {
            NcclGroup::join_within(gpu, &mut FailsAfterTheId(tcp), TIMEOUT)
        };
        (joined.err(), started.elapsed())
    });
    let (error, waited) = &results[0];
    match error {
        Some(CollectiveError::Aborted { op: "join", reason }) => {
            assert!(reason.contains("did not set up") && reason.contains("rank 0 of 2"), "{reason}")
        }
        other => panic!("rank 0: expected an aborted setup, got {other:?}"),
    }
    assert!(*waited >= TIMEOUT && *waited < TIMEOUT + Duration::from_secs(5), "failed after {waited:?}");
    assert!(matches!(results[1].0, Some(CollectiveError::Setup(_))), "rank 1: {:?}", results[1].0);
}

/// A GPU replica whose peer stops training fails within the group's timeout, through the
/// NCCL watchdog. On the host GPU, as on a GPU, the step's one collective is queued on the
/// device and the step's wait for its loss ends with the abort: the step fails (rather than
/// return the loss of partial sums), the failure is a lost peer, later calls fail at once,
/// and `state` keeps the last good epoch's parameters.
#[test]
fn an_nccl_replica_whose_peer_stops_fails_within_the_timeout() {
    use tessera::nn::{
        is_peer_lost, mlp, Dataset, GpuDataset, GpuTrainer, NnError, OptimizerConfig, TrainState,
    };
    use tessera::NcclGroup;
    if gpu_count() < 2 {
        eprintln!("skipped: fewer than two GPUs");
        return;
    }
    const TIMEOUT: Duration = Duration::from_secs(2);
    let results = on_two_gpus(|rank, gpu, mut tcp| {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits.csv");
        let data = Dataset::digits(path).unwrap().subset(&(0..256).collect::<Vec<_>>());
        let model = mlp(16, &[64, 32, 10]).unwrap();
        let mut state = TrainState::new(&model, OptimizerConfig::adam(1e-2), data.len(), 32, 5);
        let group = NcclGroup::join_within(gpu.clone(), &mut tcp, TIMEOUT).unwrap();
        // One bucket: one collective per step.
        let mut replica = GpuTrainer::replica(Box::new(group), model, &mut state, 64.0).unwrap();
        let device_data = GpuDataset::upload(&gpu, &data, 10).unwrap();
        replica.train_epoch(&mut state, &device_data).unwrap();
        if rank == 1 {
            return None; // stops training; its replica (and NCCL communicator) is dropped
        }
        let good = state.params.clone();
        let started = std::time::Instant::now();
        let error = replica.step(&mut state).unwrap_err();
        let waited = started.elapsed();
        let synced = replica.sync_state(&mut state).unwrap_err();
        let epoch = replica.train_epoch(&mut state, &device_data).unwrap_err();
        Some((error, waited, synced, epoch, state.params == good))
    });
    let Some((error, waited, synced, epoch, kept)) = results.into_iter().next().unwrap() else {
        panic!("rank 0 returned nothing")
    };
    assert!(is_peer_lost(&error), "{error}");
    let message = error.to_string();
    assert!(message.contains("all_reduce did not complete"), "{message}");
    check_abandoned(&message, waited, TIMEOUT);
    assert!(matches!(synced, NnError::WorkerGone { .. }), "{synced}");
    assert!(matches!(epoch, NnError::WorkerGone { .. }), "{epoch}");
    assert!(kept, "the failed step changed the state's parameters");
}

/// Set in the child process that runs this binary's tests on the host GPU.
const ON_HOST_GPU: &str = "TESSERA_ON_HOST_GPU";

/// How many copies between devices the host GPU has queued in this process; `None` with
/// a real driver (which counts none), and a failure on the host GPU if it cannot be read.
fn host_gpu_peer_copies() -> Option<u64> {
    let library = std::ffi::CString::new("libcuda.so").expect("no NUL");
    // SAFETY: dlopen of a NUL-terminated name, only if already loaded (cudarc loaded it).
    let handle = unsafe { libc::dlopen(library.as_ptr(), libc::RTLD_LAZY | libc::RTLD_NOLOAD) };
    let symbol = std::ffi::CString::new("tessera_host_gpu_peer_copies").expect("no NUL");
    // SAFETY: a symbol lookup in a handle dlopen gave (checked for null first).
    let counter = (!handle.is_null()).then(|| unsafe { libc::dlsym(handle, symbol.as_ptr()) });
    match counter {
        Some(counter) if !counter.is_null() => {
            // SAFETY: the host GPU defines it as `uint64_t tessera_host_gpu_peer_copies()`.
            let counter: extern "C" fn() -> u64 = unsafe { std::mem::transmute(counter) };
            Some(counter())
        }
        _ => {
            assert!(
                std::env::var_os(ON_HOST_GPU).is_none(),
                "the host GPU's peer copy counter is not reachable"
            );
            None
        }
    }
}

/// This test itself, which the child skips.
const NOT_ON_HOST_GPU: &[&str] = &["the_gpu_tests_pass_on_the_host_gpu"];

/// Runs this binary's tests again in a child process whose CUDA driver, cuBLAS and NCCL
/// are the host GPU: the GPU code paths (kernels, copies, products, launches, the
/// executor, trainers, replicas and device actors) run on the CPU, checked by the GPU
/// tests' own assertions. Skipped where there is a real GPU (the tests ran on it) or,
/// unless `TESSERA_EXPECT_CXX=1`, without a C++ compiler.
#[test]
fn the_gpu_tests_pass_on_the_host_gpu() {
    if std::env::var_os(ON_HOST_GPU).is_some() {
        return;
    }
    if cuda_devices().is_ok() {
        eprintln!("skipped: this machine has a GPU, and the tests ran on it");
        return;
    }
    // The host GPU runs kernels from their C++ build, but `Gpu` still compiles them with
    // NVRTC (the real one) first.
    let nvrtc = ["libnvrtc.so", "libnvrtc.so.12", "libnvrtc.so.13"].iter().any(|name| {
        let name = std::ffi::CString::new(*name).expect("no NUL");
        // SAFETY: dlopen of a NUL-terminated name; the handle is left open (as cudarc would).
        !unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL) }.is_null()
    });
    if !nvrtc {
        assert!(
            !std::env::var("TESSERA_EXPECT_NVRTC").is_ok_and(|v| v == "1"),
            "TESSERA_EXPECT_NVRTC=1 but no NVRTC"
        );
        eprintln!("skipped: no NVRTC (libnvrtc.so) to compile the kernels with");
        return;
    }
    // `TESSERA_HOST_GPU_DIR` keeps the library there, for other test binaries to use.
    let kept = std::env::var_os("TESSERA_HOST_GPU_DIR").map(std::path::PathBuf::from);
    let temporary = tempfile::tempdir().expect("a temporary directory");
    let dir = kept.as_deref().unwrap_or(temporary.path());
    if let Err(error) = gpu_on_host::build(dir) {
        assert!(
            !std::env::var("TESSERA_EXPECT_CXX").is_ok_and(|v| v == "1"),
            "TESSERA_EXPECT_CXX=1 but {error}"
        );
        eprintln!("skipped: no C++ compiler ({error})");
        return;
    }
    let library_path = match std::env::var("LD_LIBRARY_PATH") {
        Ok(path) if !path.is_empty() => format!("{}:{path}", dir.display()),
        _ => dir.display().to_string(),
    };
    let mut child = std::process::Command::new(std::env::current_exe().expect("this test binary"));
    child.arg("--test-threads=1");
    for skipped in NOT_ON_HOST_GPU {
        child.args(["--skip", skipped]);
    }
    // Output to files, so that a child that hangs can be killed and its output still read.
    let (out_path, err_path) = (dir.join("tests.out"), dir.join("tests.err"));
    let mut running = child
        .env(ON_HOST_GPU, "1")
        // Two devices, for the tests of NCCL across GPUs.
        .env("TESSERA_HOST_GPU_DEVICES", "2")
        .env("TESSERA_EXPECT_GPU", "1")
        .env("LD_LIBRARY_PATH", library_path)
        .stdout(std::fs::File::create(&out_path).expect("an output file"))
        .stderr(std::fs::File::create(&err_path).expect("an output file"))
        .spawn()
        .expect("running the tests on the host GPU");
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    let status = loop {
        if let Some(status) = running.try_wait().expect("waiting for the tests") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = running.kill();
            let _ = running.wait();
            panic!(
                "the GPU tests on the host GPU did not finish within 10 minutes:\n{}",
                std::fs::read_to_string(&out_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = std::process::Output {
        status,
        stdout: std::fs::read(&out_path).unwrap_or_default(),
        stderr: std::fs::read(&err_path).unwrap_or_default(),
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "the GPU tests failed on the host GPU ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}
