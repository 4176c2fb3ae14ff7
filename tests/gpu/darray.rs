//! Distributed arrays on GPUs (`DeviceDArray`), part of tests/gpu.rs: every operation
//! against the same `DArray` operation on the CPU, chunk placement and the copies it saves,
//! device memory given back, and the refused operations. On the host GPU there are two
//! devices, so the chunks are spread over both.
use std::time::Duration;

use ndarray::ArrayD;
use tessera::{
    ArrayError, BinaryOp, DArray, DeviceActor, DeviceDArray, Error, Fill, ReduceOp, Runtime, SparseDArray,
    UnaryOp,
};

use super::{host_gpu_peer_copies, or_skip};

/// Every GPU's device actor for `rt`, or `None` (a skip) without a GPU.
fn gpus(rt: &Runtime) -> Option<Vec<DeviceActor>> {
    or_skip(DeviceActor::all(rt))
}

fn uniform(rt: &Runtime, shape: &[usize], chunk: &[usize], seed: u64, low: f64) -> DArray<f32> {
    DArray::fill(rt, shape, chunk, Fill::Uniform { seed, low, high: low + 2.0 }).unwrap()
}

/// Each element within `tolerance` of the CPU's, relative to the larger magnitude (a NaN
/// only where the CPU has one).
fn assert_close(what: &str, got: &ArrayD<f32>, expected: &ArrayD<f32>, tolerance: f32) {
    assert_eq!(got.shape(), expected.shape(), "{what}: shape");
    for (i, (&g, &e)) in got.iter().zip(expected.iter()).enumerate() {
        if e.is_nan() || g.is_nan() {
            assert!(e.is_nan() && g.is_nan(), "{what}[{i}]: {g} vs {e}");
            continue;
        }
        let scale = g.abs().max(e.abs()).max(1.0);
        assert!((g - e).abs() <= tolerance * scale, "{what}[{i}]: {g} vs {e}");
    }
}

/// Sums of every device actor's copies so far.
fn copies(devices: &[DeviceActor]) -> u64 {
    devices.iter().map(DeviceActor::copies_in).sum()
}

#[test]
fn every_operation_on_the_gpus_computes_what_the_cpu_does() {
    let rt = Runtime::builder().workers(2).build().unwrap();
    let Some(devices) = gpus(&rt) else { return };
    // Chunks that do not divide the shape, so edge chunks are smaller.
    let a = uniform(&rt, &[130, 70], &[50, 32], 1, -1.0);
    let b = uniform(&rt, &[130, 70], &[50, 32], 2, 0.5);
    let (a_gpu, b_gpu) = (a.to_devices(&devices).unwrap(), b.to_devices(&devices).unwrap());
    // The round trip is exact.
    assert_eq!(a_gpu.to_array().unwrap(), a.to_array().unwrap());
    for c in 0..a.grid().num_chunks() {
        assert_eq!(a_gpu.device_of(c), Some(devices[c % devices.len()].ordinal()), "chunk {c}");
    }
    assert_eq!(a_gpu.device_of(a.grid().num_chunks()), None);

    let unary = [
        UnaryOp::Neg,
        UnaryOp::Abs,
        UnaryOp::Sqrt, // NaN for the negative elements, on both
        UnaryOp::Exp,
        UnaryOp::Ln,
        UnaryOp::Square,
        UnaryOp::Relu,
        UnaryOp::Scale(-2.5),
        UnaryOp::Offset(0.25),
        UnaryOp::Powf(1.5),
        UnaryOp::Sigmoid,
    ];
    for op in unary {
        let got = a_gpu.map(op).to_array().unwrap();
        assert_close(&format!("{op:?}"), &got, &a.map(op).to_array().unwrap(), 1e-6);
    }
    for op in [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div, BinaryOp::Min, BinaryOp::Max] {
        let got = a_gpu.zip(&b_gpu, op).unwrap().to_array().unwrap();
        assert_close(&format!("{op:?}"), &got, &a.zip(&b, op).unwrap().to_array().unwrap(), 1e-6);
    }
    // NaNs lose to numbers, in zips and in reductions, as on the CPU.
    let with_nans = a.map(UnaryOp::Sqrt);
    let with_nans_gpu = a_gpu.map(UnaryOp::Sqrt);
    for op in [BinaryOp::Min, BinaryOp::Max] {
        let got = with_nans_gpu.zip(&b_gpu, op).unwrap().to_array().unwrap();
        assert_close(
            &format!("{op:?} with NaNs"),
            &got,
            &with_nans.zip(&b, op).unwrap().to_array().unwrap(),
            0.0,
        );
    }
    // (Sums with NaNs are NaN on both.)
    let agree = |got: f32, expected: f32| {
        (got.is_nan() && expected.is_nan()) || (got - expected).abs() <= 1e-4 * expected.abs().max(1.0)
    };
    for op in [ReduceOp::Sum, ReduceOp::Min, ReduceOp::Max] {
        let expected = a.reduce(op).unwrap().blocking_get().unwrap();
        let got = a_gpu.reduce(op).unwrap();
        assert!(agree(got, expected) && !got.is_nan(), "{op:?}: {got} vs {expected}");
        let expected = with_nans.reduce(op).unwrap().blocking_get().unwrap();
        let got = with_nans_gpu.reduce(op).unwrap();
        assert!(agree(got, expected), "{op:?} with NaNs: {got} vs {expected}");
        assert_eq!(got.is_nan(), op == ReduceOp::Sum, "{op:?} with NaNs: {got}");
    }

    // Transposes (edge chunks, chunks of other sizes than a tile) are exact.
    assert_eq!(a_gpu.transpose().unwrap().to_array().unwrap(), a.transpose().unwrap().to_array().unwrap());
    let twice = a_gpu.transpose().unwrap().transpose().unwrap();
    assert_eq!(twice.grid(), a_gpu.grid());
    assert_eq!(twice.to_array().unwrap(), a.to_array().unwrap());
    let vector = uniform(&rt, &[64], &[32], 11, -1.0).to_devices(&devices).unwrap();
    assert!(matches!(
        vector.transpose(),
        Err(Error::Array(ArrayError::RankMismatch { op: "transpose", .. }))
    ));

    // Matmul: 130×70 · 70×90, the inner dimension in 3 tiles (the last one short).
    let c = uniform(&rt, &[70, 90], &[32, 40], 3, -1.0);
    let c_gpu = c.to_devices(&devices).unwrap();
    let product = a_gpu.matmul(&c_gpu).unwrap();
    assert_eq!(product.grid().chunk_shape(), &[50, 40]);
    assert_close("matmul", &product.to_array().unwrap(), &a.matmul(&c).unwrap().to_array().unwrap(), 1e-4);
    // Results stay on the devices: a chain of operations, read once at the end.
    let chained =
        product.map(UnaryOp::Relu).zip(&product, BinaryOp::Mul).unwrap().reduce(ReduceOp::Sum).unwrap();
    let product_cpu = a.matmul(&c).unwrap();
    let expected = product_cpu.map(UnaryOp::Relu).zip(&product_cpu, BinaryOp::Mul).unwrap();
    let expected = expected.reduce(ReduceOp::Sum).unwrap().blocking_get().unwrap();
    assert!((chained - expected).abs() <= 1e-4 * expected.abs(), "{chained} vs {expected}");
    // Saved from the GPUs, it loads back as a DArray, equal.
    let dir = tempfile::tempdir().unwrap();
    let stash = tessera::Stash::open(dir.path()).unwrap();
    let version = product.save(&stash, "product", &[("on", "gpus")]).unwrap();
    let loaded = DArray::<f32>::load_version(&rt, &stash, "product", version).unwrap();
    assert_eq!(loaded.to_array().unwrap(), product.to_array().unwrap());
    assert_eq!(loaded.to_devices(&devices).unwrap().to_array().unwrap(), product.to_array().unwrap());
    // Back to the host as a DArray that host operations continue from.
    let back = product.to_darray().map(UnaryOp::Scale(2.0)).to_array().unwrap();
    assert_close("to_darray", &back, &product_cpu.map(UnaryOp::Scale(2.0)).to_array().unwrap(), 1e-4);
    rt.shutdown();
}

/// Chunk `c` of every array is on device `c mod n`: operations between arrays of one grid
/// copy nothing; a matmul copies exactly the input tiles that live on another device than
/// their output tile.
#[test]
fn chunks_stay_on_their_devices_and_only_foreign_tiles_are_copied() {
    let rt = Runtime::builder().workers(2).build().unwrap();
    let Some(devices) = gpus(&rt) else { return };
    let n = devices.len();
    let a = uniform(&rt, &[96, 64], &[32, 32], 4, -1.0).to_devices(&devices).unwrap();
    let b = uniform(&rt, &[96, 64], &[32, 32], 5, -1.0).to_devices(&devices).unwrap();
    a.wait().unwrap();
    b.wait().unwrap();
    let before = copies(&devices);
    let sum = a.zip(&b, BinaryOp::Add).unwrap().map(UnaryOp::Square);
    sum.wait().unwrap();
    assert_eq!(copies(&devices), before, "operations on one grid copied chunks");

    // (96×64 in 3×2 tiles) · (64×96 in 2×3 tiles): output tile (i, j) = chunk 3i + j reads
    // a's chunks 2i + p and b's chunks 3p + j.
    let b_t = uniform(&rt, &[64, 96], &[32, 32], 6, -1.0).to_devices(&devices).unwrap();
    b_t.wait().unwrap();
    let before = copies(&devices);
    let peer_before = host_gpu_peer_copies();
    let product = a.matmul(&b_t).unwrap();
    for (c, chunk) in product.chunks().iter().enumerate() {
        let chunk = chunk.blocking_get_timeout(Duration::from_secs(30)).unwrap();
        assert_eq!(chunk.device(), Some(devices[c % n].ordinal()), "product chunk {c}");
        assert_eq!(product.device_of(c), chunk.device(), "product chunk {c}");
    }
    let mut expected = 0;
    for i in 0..3 {
        for j in 0..3 {
            let out = (3 * i + j) % n;
            expected += (0..2).filter(|p| (2 * i + p) % n != out).count();
            expected += (0..2).filter(|p| (3 * p + j) % n != out).count();
        }
    }
    assert_eq!(copies(&devices) - before, expected as u64, "{n} device(s)");
    if n > 1 {
        assert!(expected > 0, "two devices and no tile crossed between them");
    }
    // Every tile crossed from device to device directly, none through the host.
    if let (Some(peer_before), Some(peer_after)) = (peer_before, host_gpu_peer_copies()) {
        assert_eq!(peer_after - peer_before, expected as u64, "copies between devices");
    }
    rt.shutdown();
}

#[test]
fn device_memory_of_an_array_is_given_back_when_it_drops() {
    let rt = Runtime::builder().workers(2).build().unwrap();
    let Some(devices) = gpus(&rt) else { return };
    let live = |devices: &[DeviceActor]| devices.iter().map(DeviceActor::live_bytes).sum::<usize>();
    let before = live(&devices);
    let a = uniform(&rt, &[256, 256], &[64, 64], 7, -1.0).to_devices(&devices).unwrap();
    let b = a.map(UnaryOp::Exp);
    b.wait().unwrap();
    assert_eq!(live(&devices), before + 2 * 256 * 256 * 4);
    drop(a);
    assert_eq!(live(&devices), before + 256 * 256 * 4, "a's chunks were not freed");
    drop(b);
    // Work still queued holds its inputs; once it is done, nothing is left.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while live(&devices) != before && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(live(&devices), before);
    rt.shutdown();
}

#[test]
fn refused_operations_say_why() {
    let rt = Runtime::builder().workers(1).build().unwrap();
    let a = uniform(&rt, &[64, 64], &[32, 32], 8, -1.0);
    match a.to_devices(&[]) {
        Err(Error::Array(ArrayError::NoDevices)) => {}
        other => panic!("expected NoDevices, got {other:?}"),
    }
    let Some(devices) = gpus(&rt) else { return };
    let a_gpu = a.to_devices(&devices).unwrap();
    let other_chunks = uniform(&rt, &[64, 64], &[16, 64], 9, -1.0).to_devices(&devices).unwrap();
    let message = |result: tessera::Result<DeviceDArray>| result.unwrap_err().to_string();
    let zipped = message(a_gpu.zip(&other_chunks, BinaryOp::Add));
    assert!(zipped.contains("chunk shapes [32, 32] and [16, 64]") && zipped.contains("rechunk"), "{zipped}");
    let multiplied = message(a_gpu.matmul(&other_chunks));
    assert!(multiplied.contains("do not line up"), "{multiplied}");
    let wrong_shape = uniform(&rt, &[32, 64], &[32, 32], 10, -1.0).to_devices(&devices).unwrap();
    assert!(matches!(
        a_gpu.zip(&wrong_shape, BinaryOp::Add),
        Err(Error::Array(ArrayError::ShapeMismatch { op: "zip", .. }))
    ));
    assert!(matches!(
        wrong_shape.matmul(&wrong_shape),
        Err(Error::Array(ArrayError::ShapeMismatch { op: "matmul", .. }))
    ));
    let vector = uniform(&rt, &[64], &[32], 11, -1.0).to_devices(&devices).unwrap();
    assert!(matches!(
        vector.matmul(&a_gpu),
        Err(Error::Array(ArrayError::RankMismatch { op: "matmul", expected: 2, got: 1 }))
    ));
    let empty = DArray::<f32>::zeros(&rt, &[0, 8], &[4, 4]).unwrap().to_devices(&devices).unwrap();
    assert_eq!(empty.reduce(ReduceOp::Sum).unwrap(), 0.0);
    assert!(matches!(
        empty.reduce(ReduceOp::Max),
        Err(Error::Array(ArrayError::Empty { op: ReduceOp::Max }))
    ));
    // Device actors of another runtime are refused.
    let other_rt = Runtime::builder().workers(1).build().unwrap();
    let foreign = DeviceActor::all(&other_rt).unwrap();
    match a.to_devices(&foreign) {
        Err(Error::Array(ArrayError::ForeignDevice { ordinal })) => assert_eq!(ordinal, foreign[0].ordinal()),
        other => panic!("expected ForeignDevice, got {other:?}"),
    }
    other_rt.shutdown();
    rt.shutdown();
}

/// Sparse matrices on the GPUs: products with vectors and matrices (cut into several
/// chunks, joined on each block's device) match the same products on the CPU, for the
/// 2-D Laplacian and a random matrix, with blocks that do not divide the rows.
#[test]
fn sparse_products_on_the_gpus_compute_what_the_cpu_does() {
    let rt = Runtime::builder().workers(2).build().unwrap();
    let Some(devices) = gpus(&rt) else { return };
    let poisson = SparseDArray::<f32>::poisson_2d(&rt, 30, 250).unwrap(); // 900 rows, 4 blocks
    let random = SparseDArray::<f32>::random(&rt, [700, 900], 10, 3, 300).unwrap();
    for (name, matrix) in [("poisson", &poisson), ("random", &random)] {
        let on_gpus = matrix.to_devices(&devices).unwrap();
        assert_eq!(on_gpus.shape(), matrix.shape());
        assert_eq!(on_gpus.num_blocks(), matrix.num_blocks());
        let x = uniform(&rt, &[900], &[250], 12, -1.0);
        let got = on_gpus.matmul(&x.to_devices(&devices).unwrap()).unwrap();
        assert_eq!(got.grid().chunk_shape(), &[matrix.block_rows()]);
        for b in 0..matrix.num_blocks() {
            assert_eq!(got.device_of(b), Some(devices[b % devices.len()].ordinal()));
        }
        assert_close(name, &got.to_array().unwrap(), &matrix.matmul(&x).unwrap().to_array().unwrap(), 1e-5);
        let xs = uniform(&rt, &[900, 5], &[400, 5], 13, -1.0);
        let got = on_gpus.matmul(&xs.to_devices(&devices).unwrap()).unwrap();
        let expected = matrix.matmul(&xs).unwrap().to_array().unwrap();
        assert_close(&format!("{name} × matrix"), &got.to_array().unwrap(), &expected, 1e-5);
        // With no columns, the product has no elements.
        let none = DArray::<f32>::zeros(&rt, &[900, 0], &[400, 1]).unwrap().to_devices(&devices).unwrap();
        let empty = on_gpus.matmul(&none).unwrap();
        assert_eq!((empty.shape(), empty.to_array().unwrap().len()), (&[matrix.shape()[0], 0][..], 0));
        // A matrix cut between its columns is refused; so is a vector of the wrong length.
        let split = uniform(&rt, &[900, 5], &[900, 2], 14, -1.0).to_devices(&devices).unwrap();
        assert!(matches!(on_gpus.matmul(&split), Err(Error::Array(ArrayError::ChunkMismatch { .. }))));
        let short = uniform(&rt, &[899], &[300], 15, -1.0).to_devices(&devices).unwrap();
        assert!(matches!(on_gpus.matmul(&short), Err(Error::Array(ArrayError::ShapeMismatch { .. }))));
    }
    rt.shutdown();
}

/// Conjugate gradient on the 2-D Laplacian, all on the GPUs (cuSPARSE products, dot
/// products by zip and reduce, updates by map and zip): the recurrence's residual falls
/// below 1e-4 of the right-hand side, and the true residual of the solution, computed on
/// the CPU, below 1e-3.
#[test]
fn conjugate_gradient_on_the_gpus_converges() {
    let rt = Runtime::builder().workers(2).build().unwrap();
    let Some(devices) = gpus(&rt) else { return };
    let (n, block) = (24, 200); // 576 unknowns, 3 blocks
    let a = SparseDArray::<f32>::poisson_2d(&rt, n, block).unwrap();
    let b = DArray::<f32>::fill(&rt, &[n * n], &[block], Fill::Constant(1.0)).unwrap();
    let (a_gpu, b_gpu) = (a.to_devices(&devices).unwrap(), b.to_devices(&devices).unwrap());
    let dot =
        |u: &DeviceDArray, v: &DeviceDArray| u.zip(v, BinaryOp::Mul).unwrap().reduce(ReduceOp::Sum).unwrap();
    let axpy = |alpha: f32, x: &DeviceDArray, y: &DeviceDArray| {
        x.map(UnaryOp::Scale(f64::from(alpha))).zip(y, BinaryOp::Add).unwrap()
    };
    let mut x = b_gpu.map(UnaryOp::Scale(0.0));
    let mut r = b_gpu.clone();
    let mut p = r.clone();
    let mut rs = dot(&r, &r);
    let b_norm = rs.sqrt();
    let mut iterations = 0;
    while rs.sqrt() > 1e-4 * b_norm && iterations < 200 {
        let ap = a_gpu.matmul(&p).unwrap();
        let alpha = rs / dot(&p, &ap);
        x = axpy(alpha, &p, &x);
        r = axpy(-alpha, &ap, &r);
        let rs_next = dot(&r, &r);
        p = axpy(rs_next / rs, &p, &r);
        rs = rs_next;
        iterations += 1;
    }
    assert!(rs.sqrt() <= 1e-4 * b_norm, "no convergence in {iterations} iterations: residual {}", rs.sqrt());
    // The true residual, on the CPU, from the GPUs' solution.
    let x_host = x.to_darray();
    let residual = a.matmul(&x_host).unwrap().zip(&b, BinaryOp::Sub).unwrap();
    let residual =
        residual.map(UnaryOp::Square).reduce(ReduceOp::Sum).unwrap().blocking_get().unwrap().sqrt();
    assert!(residual <= 1e-3 * b_norm, "true residual {residual} after {iterations} iterations");
    eprintln!("CG on {} GPU(s): {iterations} iterations, residual {residual:.2e}", devices.len());
    rt.shutdown();
}
