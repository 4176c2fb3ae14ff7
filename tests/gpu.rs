//! CUDA device tests (feature `cuda`). On a machine without a GPU they check that
//! discovery reports the missing device as an error, and (with NVRTC installed, as CI does)
//! that every kernel compiles; `scripts/gpu-check.sh` runs them where a GPU is.
#![cfg(feature = "cuda")]

use tessera::{compile_all_kernels, cuda_devices, DeviceError, Gpu, KERNELS};

/// Whether this machine should have a GPU (set by `scripts/gpu-check.sh`): then a missing
/// device is a failure, not a skip.
fn gpu_expected() -> bool {
    std::env::var("TESSERA_EXPECT_GPU").is_ok_and(|v| v == "1")
}

fn gpu() -> Option<Gpu> {
    match Gpu::open(0) {
        Ok(gpu) => Some(gpu),
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
    match compile_all_kernels() {
        Ok(compiled) => {
            assert_eq!(compiled.len(), KERNELS.len());
            for (name, ptx) in compiled {
                let text = ptx.to_src();
                assert!(text.contains(&format!(".entry {name}")), "PTX of {name} lacks its entry point");
            }
        }
        Err(DeviceError::MissingLibrary { library, .. }) if !nvrtc_expected => {
            eprintln!("skipped: {library} is not installed");
        }
        Err(error) => panic!("{error}"),
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
    assert!((total - relu.iter().sum::<f32>()).abs() < 1e-2, "{total}");
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
fn nccl_with_one_rank_per_gpu() {
    use std::sync::Arc;
    use tessera::{Communicator, GroupConfig, NcclGroup, Rendezvous, TcpGroup};
    let Some(gpu) = gpu() else { return };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let meet =
        std::thread::spawn(move || Rendezvous::serve(listener, 1, "s", std::time::Duration::from_secs(10)));
    let mut bootstrap = TcpGroup::join(GroupConfig::new(0, 1, addr, "s")).unwrap();
    meet.join().unwrap().unwrap();
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
