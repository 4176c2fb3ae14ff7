//! Distributed arrays on the in-process runtime, checked against ndarray doing the same
//! on one array: random shapes and chunkings, every operation, errors, save and load.
//! (`tests/cluster.rs` runs them over node processes.)
use std::ops::Range;
use std::sync::OnceLock;

use anyhow::{ensure, Result};
use ndarray::{s, Array, ArrayD, IxDyn};
use proptest::prelude::*;
use tessera::{ArrayError, BinaryOp, DArray, Error, Fill, ReduceOp, Runtime, Stash, UnaryOp};

fn rt() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| Runtime::builder().workers(4).build().expect("runtime"))
}

/// A shape of 1 to 3 dimensions and a chunk shape for it (chunks may exceed the shape).
fn shape_and_chunk() -> impl Strategy<Value = (Vec<usize>, Vec<usize>)> {
    prop::collection::vec((0usize..9, 1usize..5), 1..4).prop_map(|dims| dims.into_iter().unzip())
}

/// The array whose elements are their row-major indices.
fn index_array(shape: &[usize]) -> ArrayD<f64> {
    let n: usize = shape.iter().product();
    Array::from_iter((0..n).map(|i| i as f64)).into_shape_with_order(IxDyn(shape)).expect("shape")
}

fn array_error(error: &Error) -> Option<&ArrayError> {
    match error {
        Error::Array(e) => Some(e),
        _ => None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn any_chunking_gathers_back_to_the_same_array((shape, chunk) in shape_and_chunk()) {
        let expected = index_array(&shape);
        let from_local = DArray::<f64>::from_array(rt(), &expected, &chunk).unwrap();
        prop_assert_eq!(from_local.to_array().unwrap(), expected.clone());
        let filled = DArray::<f64>::fill(rt(), &shape, &chunk, Fill::Index).unwrap();
        prop_assert_eq!(filled.to_array().unwrap(), expected);
    }

    #[test]
    fn slices_and_rechunks_match_ndarray(
        (shape, chunk) in shape_and_chunk(),
        cuts in prop::collection::vec((0usize..10, 0usize..10), 3),
        rechunk in prop::collection::vec(1usize..6, 3),
    ) {
        let whole = index_array(&shape);
        let array = DArray::<f64>::fill(rt(), &shape, &chunk, Fill::Index).unwrap();
        let ranges: Vec<_> = shape.iter().zip(&cuts).map(|(&d, &(a, b))| {
            let (a, b) = (a.min(d), b.min(d));
            a.min(b)..a.max(b)
        }).collect();
        let sliced = array.slice(&ranges).unwrap();
        let info: Vec<ndarray::SliceInfoElem> = ranges.iter().map(|r| (r.start..r.end).into()).collect();
        let expected = whole.slice(info.as_slice()).to_owned();
        prop_assert_eq!(sliced.shape(), expected.shape());
        prop_assert_eq!(sliced.to_array().unwrap(), expected);
        let rechunked = array.rechunk(&rechunk[..shape.len()]).unwrap();
        prop_assert_eq!(rechunked.to_array().unwrap(), whole);
    }
}

#[test]
fn elementwise_ops_and_reductions_match_ndarray() -> Result<()> {
    let shape = [37, 23];
    let a = DArray::<f64>::fill(rt(), &shape, &[10, 8], Fill::Uniform { seed: 1, low: -1.0, high: 1.0 })?;
    // Another chunking: zip rechunks it to `a`'s grid.
    let b = DArray::<f64>::fill(rt(), &shape, &[7, 23], Fill::Uniform { seed: 2, low: 0.5, high: 2.0 })?;
    let (la, lb) = (a.to_array()?, b.to_array()?);
    let close = |x: &ArrayD<f64>, y: &ArrayD<f64>| {
        x.iter().zip(y).all(|(p, q)| (p - q).abs() <= 1e-12 * q.abs().max(1.0))
    };
    let cases: Vec<(DArray<f64>, ArrayD<f64>)> = vec![
        (a.zip(&b, BinaryOp::Add)?, &la + &lb),
        (a.zip(&b, BinaryOp::Sub)?, &la - &lb),
        (a.zip(&b, BinaryOp::Mul)?, &la * &lb),
        (a.zip(&b, BinaryOp::Div)?, &la / &lb),
        (a.zip(&b, BinaryOp::Max)?, ndarray::Zip::from(&la).and(&lb).map_collect(|x, y| x.max(*y))),
        (a.map(UnaryOp::Relu), la.mapv(|x| x.max(0.0))),
        (a.map(UnaryOp::Sigmoid), la.mapv(|x| 1.0 / (1.0 + (-x).exp()))),
        (a.map(UnaryOp::Exp), la.mapv(f64::exp)),
        (b.map(UnaryOp::Ln), lb.mapv(f64::ln)),
        (b.map(UnaryOp::Powf(1.5)), lb.mapv(|x| x.powf(1.5))),
        (a.map(UnaryOp::Scale(3.0)).map(UnaryOp::Offset(-1.0)), la.mapv(|x| 3.0 * x - 1.0)),
    ];
    for (i, (got, expected)) in cases.iter().enumerate() {
        ensure!(close(&got.to_array()?, expected), "case {i} differs");
    }
    let sum = a.reduce(ReduceOp::Sum)?.blocking_get()?;
    ensure!((sum - la.sum()).abs() < 1e-9, "sum {sum} vs {}", la.sum());
    let max = a.reduce(ReduceOp::Max)?.blocking_get()?;
    let min = a.reduce(ReduceOp::Min)?.blocking_get()?;
    ensure!(max == la.fold(f64::MIN, |m, &x| m.max(x)) && min == la.fold(f64::MAX, |m, &x| m.min(x)));
    // f32 sums accumulate in f64 within each chunk: 2^24 + 1 ones are counted exactly.
    let ones = DArray::<f32>::fill(rt(), &[(1 << 24) + 1], &[1 << 22], Fill::Constant(1.0))?;
    ensure!(ones.reduce(ReduceOp::Sum)?.blocking_get()? == 16_777_216.0, "f32 sum lost ones");
    Ok(())
}

#[test]
fn fills_do_not_depend_on_the_chunking() -> Result<()> {
    for fill in
        [Fill::Uniform { seed: 7, low: 2.0, high: 3.0 }, Fill::Normal { seed: 7, mean: 1.0, std: 2.0 }]
    {
        let a = DArray::<f32>::fill(rt(), &[50, 40], &[50, 40], fill)?.to_array()?;
        let b = DArray::<f32>::fill(rt(), &[50, 40], &[7, 9], fill)?.to_array()?;
        ensure!(a == b, "{fill:?} depends on the chunks");
        let mean = a.mean().unwrap_or_default();
        match fill {
            Fill::Uniform { .. } => {
                ensure!(a.iter().all(|&x| (2.0..3.0).contains(&x)) && (mean - 2.5).abs() < 0.05)
            }
            _ => ensure!((mean - 1.0).abs() < 0.15, "normal mean {mean}"),
        }
    }
    Ok(())
}

#[test]
fn tiled_matmul_matches_ndarray_for_any_tiling() -> Result<()> {
    let (m, k, n) = (70, 45, 33);
    let a = DArray::<f64>::fill(rt(), &[m, k], &[16, 10], Fill::Normal { seed: 3, mean: 0.0, std: 1.0 })?;
    let (la,) = (a.to_array()?.into_dimensionality::<ndarray::Ix2>()?,);
    // Aligned, misaligned (other is rechunked), and one tile of everything.
    for chunk in [[10, 11], [7, 33], [45, 33]] {
        let b = DArray::<f64>::fill(rt(), &[k, n], &chunk, Fill::Uniform { seed: 4, low: -1.0, high: 1.0 })?;
        let lb = b.to_array()?.into_dimensionality::<ndarray::Ix2>()?;
        let c = a.matmul(&b)?;
        ensure!(c.shape() == [m, n] && c.grid().chunk_shape() == [16, chunk[1]]);
        let expected = la.dot(&lb);
        let got = c.to_array()?.into_dimensionality::<ndarray::Ix2>()?;
        let worst = (&got - &expected).iter().fold(0.0f64, |w, d| w.max(d.abs()));
        ensure!(worst < 1e-10, "chunks {chunk:?}: off by {worst}");
    }
    // Aᵀ·A through transpose: uneven tiles on both sides.
    let ata = a.transpose()?.matmul(&a)?.to_array()?.into_dimensionality::<ndarray::Ix2>()?;
    ensure!(a.transpose()?.to_array()? == la.t().into_dyn().to_owned(), "transpose differs");
    let worst = (&ata - &la.t().dot(&la)).iter().fold(0.0f64, |w, d| w.max(d.abs()));
    ensure!(worst < 1e-10, "AᵀA off by {worst}");
    // f32 through sgemm.
    let a32 = DArray::<f32>::fill(rt(), &[64, 48], &[32, 16], Fill::Index)?.map(UnaryOp::Scale(1e-3));
    let b32 = DArray::<f32>::fill(rt(), &[48, 20], &[16, 16], Fill::Constant(0.5))?;
    let (la32, lb32) = (a32.to_array()?, b32.to_array()?);
    let expected =
        la32.into_dimensionality::<ndarray::Ix2>()?.dot(&lb32.into_dimensionality::<ndarray::Ix2>()?);
    let got = a32.matmul(&b32)?.to_array()?.into_dimensionality::<ndarray::Ix2>()?;
    ensure!(got.iter().zip(&expected).all(|(x, y)| (x - y).abs() <= 1e-4 * y.abs().max(1.0)));
    // k = 0: all zeros.
    let empty =
        DArray::<f64>::zeros(rt(), &[3, 0], &[2, 2])?.matmul(&DArray::zeros(rt(), &[0, 4], &[2, 2])?)?;
    ensure!(empty.to_array()? == ArrayD::<f64>::zeros(IxDyn(&[3, 4])));
    Ok(())
}

#[test]
fn bad_operations_are_typed_errors() -> Result<()> {
    let a = DArray::<f64>::zeros(rt(), &[4, 6], &[2, 2])?;
    let b = DArray::<f64>::zeros(rt(), &[6, 4], &[2, 2])?;
    let v = DArray::<f64>::zeros(rt(), &[4], &[2])?;
    let checks: Vec<(&str, Error)> = vec![
        ("zip of other shapes", a.zip(&b, BinaryOp::Add).unwrap_err()),
        ("matmul of a vector", a.matmul(&v).unwrap_err()),
        ("transpose of a vector", v.transpose().unwrap_err()),
        ("matmul with unequal inner sizes", a.matmul(&a).unwrap_err()),
        ("slice past the end", a.slice(&[0..4, 2..7]).unwrap_err()),
        ("slice of another rank", a.slice(&vec![0..4; 1]).unwrap_err()),
        ("reversed slice", a.slice(&[Range { start: 3, end: 1 }, 0..2]).unwrap_err()),
        ("chunk with a 0", DArray::<f64>::zeros(rt(), &[4], &[0]).unwrap_err()),
        ("chunk of another rank", a.rechunk(&[2]).unwrap_err()),
        ("max of nothing", DArray::<f64>::zeros(rt(), &[0, 3], &[1, 1])?.reduce(ReduceOp::Max).unwrap_err()),
    ];
    for (what, error) in &checks {
        ensure!(array_error(error).is_some(), "{what}: {error:?} is not an array error");
        ensure!(!error.to_string().is_empty());
    }
    ensure!(checks[0].1.to_string().contains("[4, 6]") && checks[0].1.to_string().contains("[6, 4]"));
    // The sum of nothing is 0.
    ensure!(DArray::<f64>::zeros(rt(), &[0], &[4])?.reduce(ReduceOp::Sum)?.blocking_get()? == 0.0);
    Ok(())
}

#[test]
fn saved_arrays_load_back_by_version_and_refuse_another_type() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let stash = Stash::open(dir.path())?;
    let a = DArray::<f32>::fill(rt(), &[300, 70], &[64, 32], Fill::Normal { seed: 9, mean: 0.0, std: 1.0 })?;
    let v1 = a.save(&stash, "weights", &[("step", "1")])?;
    let b = a.map(UnaryOp::Scale(2.0));
    let v2 = b.save(&stash, "weights", &[("step", "2")])?;
    ensure!(v2 > v1);
    let latest = DArray::<f32>::load(rt(), &stash, "weights")?;
    ensure!(latest.grid() == b.grid(), "grid {:?}", latest.grid());
    ensure!(latest.to_array()? == b.to_array()?, "latest differs");
    let first = DArray::<f32>::load_version(rt(), &stash, "weights", v1)?;
    ensure!(first.to_array()? == a.to_array()?, "version 1 differs");
    let info = stash.info("weights", Some(v2))?;
    ensure!(info.tags.iter().any(|(k, v)| k == "step" && v == "2"), "tags {:?}", info.tags);
    ensure!(stash.history("weights/chunk/0")?.len() == 2, "one chunk entry per save");
    // The wrong element type, and a value that is no DArray, are refused by name.
    let wrong = DArray::<f64>::load(rt(), &stash, "weights").unwrap_err();
    ensure!(matches!(array_error(&wrong), Some(ArrayError::NotADArray { .. })), "{wrong}");
    stash.save("note", &"hello".to_string(), &[])?;
    ensure!(matches!(DArray::<f32>::load(rt(), &stash, "note"), Err(Error::Store(_))));
    // A progress observer hears of every chunk, under the array's name, up to its size.
    let heard = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = heard.clone();
    let watched = stash.clone().with_progress(move |p| {
        if p.name == "weights" {
            log.lock().unwrap().push((p.kind, p.done, p.total));
        }
    });
    b.save(&watched, "weights", &[])?;
    DArray::<f32>::load(rt(), &watched, "weights")?;
    let heard = heard.lock().unwrap().clone();
    let bytes = (300 * 70 * 4) as u64;
    for kind in [tessera::TransferKind::Save, tessera::TransferKind::Load] {
        // (The manifest's own save and load are reported under the name too, with its size.)
        let of_kind: Vec<_> = heard.iter().filter(|h| h.0 == kind && h.2 == bytes).collect();
        ensure!(of_kind.len() == a.grid().num_chunks(), "{kind:?}: {heard:?}");
        ensure!(of_kind.iter().any(|h| h.1 == bytes), "{of_kind:?}");
    }
    // Saving a slice of the loaded array is independent of the original chunks.
    let part = latest.slice(&[100..200, 0..70])?;
    part.save(&stash, "part", &[])?;
    let back = DArray::<f32>::load(rt(), &stash, "part")?.to_array()?;
    ensure!(back == b.to_array()?.slice(s![100..200, ..]).into_dyn().to_owned());
    Ok(())
}

/// A `sprs` matrix with about `density` of its entries set, from `seed`.
fn random_csr(rows: usize, cols: usize, density: f64, seed: u64) -> sprs::CsMat<f64> {
    let mut triplets = sprs::TriMat::new((rows, cols));
    for r in 0..rows {
        for c in 0..cols {
            let u = Fill::Uniform { seed, low: 0.0, high: 1.0 }.value_at((r * cols + c) as u64);
            if u < density {
                triplets.add_triplet(r, c, u * 10.0 - 1.0);
            }
        }
    }
    triplets.to_csr()
}

/// `A·x` computed row by row from the `sprs` matrix.
fn dense_product(a: &sprs::CsMat<f64>, x: &ndarray::Array2<f64>) -> ndarray::Array2<f64> {
    let mut out = ndarray::Array2::zeros((a.rows(), x.ncols()));
    for (r, row) in a.outer_iterator().enumerate() {
        for (c, &v) in row.iter() {
            for k in 0..x.ncols() {
                out[[r, k]] += v * x[[c, k]];
            }
        }
    }
    out
}

#[test]
fn sparse_products_match_sprs_for_any_blocking() -> Result<()> {
    let a = random_csr(53, 41, 0.15, 5);
    let x = DArray::<f64>::fill(rt(), &[41, 3], &[9, 2], Fill::Uniform { seed: 6, low: -1.0, high: 1.0 })?;
    let lx = x.to_array()?.into_dimensionality::<ndarray::Ix2>()?;
    let expected = dense_product(&a, &lx);
    for block_rows in [1, 7, 53, 100] {
        let s = tessera::SparseDArray::from_csr(rt(), &a, block_rows)?;
        ensure!(s.to_csr()? == a, "blocks of {block_rows}: the matrix did not gather back");
        let got = s.matmul(&x)?.to_array()?.into_dimensionality::<ndarray::Ix2>()?;
        let worst = (&got - &expected).iter().fold(0.0f64, |w, d| w.max(d.abs()));
        ensure!(worst < 1e-12, "blocks of {block_rows}: SpMM off by {worst}");
        let v = x.slice(&[0..41, 1..2])?.rechunk(&[5, 1])?.to_array()?.into_shape_with_order(41)?;
        let v = DArray::from_array(rt(), &v, &[10])?;
        let got = s.matmul(&v)?.to_array()?;
        let worst = got.iter().zip(expected.column(1)).fold(0.0f64, |w, (p, q)| w.max((p - q).abs()));
        ensure!(got.shape() == [53] && worst < 1e-12, "blocks of {block_rows}: SpMV off by {worst}");
    }
    // A CSC input is converted.
    let csc = tessera::SparseDArray::from_csr(rt(), &a.to_csc(), 10)?;
    ensure!(csc.to_csr()? == a, "CSC input");
    let wrong = csc.matmul(&DArray::<f64>::zeros(rt(), &[40], &[8])?).unwrap_err();
    ensure!(matches!(array_error(&wrong), Some(ArrayError::ShapeMismatch { .. })), "{wrong}");
    ensure!(tessera::SparseDArray::from_csr(rt(), &a, 0).is_err(), "0 rows a block");
    Ok(())
}

#[test]
fn saved_sparse_matrices_load_back_by_version_and_refuse_another_type() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let stash = Stash::open(dir.path())?;
    let a = random_csr(120, 90, 0.1, 8);
    let s1 = tessera::SparseDArray::from_csr(rt(), &a, 25)?;
    let v1 = s1.save(&stash, "adjacency", &[("graph", "a")])?;
    let bytes_after_first = stash.stats()?.chunk_bytes;
    // Saving the same blocks again stores no new block bytes (only manifests and records).
    let again = s1.save(&stash, "adjacency", &[])?;
    ensure!(stash.stats()?.chunk_bytes - bytes_after_first < 2048, "a re-save stored the blocks again");
    let p = tessera::SparseDArray::<f64>::poisson_2d(rt(), 12, 50)?;
    let v2 = p.save(&stash, "adjacency", &[("graph", "poisson")])?;
    ensure!(v1 < again && again < v2);

    let latest = tessera::SparseDArray::<f64>::load(rt(), &stash, "adjacency")?;
    ensure!(latest.shape() == [144, 144] && latest.block_rows() == 50 && latest.num_blocks() == 3);
    ensure!(latest.to_csr()? == p.to_csr()?, "latest differs");
    let first = tessera::SparseDArray::<f64>::load_version(rt(), &stash, "adjacency", v1)?;
    ensure!(first.to_csr()? == a && first.num_blocks() == 5, "version 1 differs");
    let x = DArray::<f64>::fill(rt(), &[90], &[30], Fill::Uniform { seed: 2, low: -1.0, high: 1.0 })?;
    ensure!(first.matmul(&x)?.to_array()? == s1.matmul(&x)?.to_array()?, "a loaded matrix multiplies alike");
    ensure!(stash.history("adjacency/block/0")?.len() == 3, "one block entry per save");

    // The wrong element type, a dense array, and a value that is neither, are refused.
    let wrong = tessera::SparseDArray::<f32>::load(rt(), &stash, "adjacency").unwrap_err();
    ensure!(matches!(array_error(&wrong), Some(ArrayError::NotADArray { .. })), "{wrong}");
    DArray::<f64>::zeros(rt(), &[4, 4], &[2, 2])?.save(&stash, "dense", &[])?;
    let wrong = tessera::SparseDArray::<f64>::load(rt(), &stash, "dense").unwrap_err();
    ensure!(matches!(wrong, Error::Store(_)) && wrong.to_string().contains("Manifest"), "{wrong}");
    ensure!(DArray::<f64>::load(rt(), &stash, "adjacency").is_err(), "a sparse matrix is no dense array");
    // A later version of a block's entry does not change a saved matrix: the manifest
    // names each block's exact version.
    stash.save("adjacency/block/1", &7usize, &[])?;
    let pinned = tessera::SparseDArray::<f64>::load(rt(), &stash, "adjacency")?;
    ensure!(pinned.to_csr()? == p.to_csr()?, "the manifest pins block versions");
    Ok(())
}

#[test]
fn transposed_sparse_products_match_sprs_for_any_blocking() -> Result<()> {
    let a = random_csr(53, 41, 0.15, 21);
    let y = DArray::<f64>::fill(rt(), &[53, 3], &[9, 2], Fill::Uniform { seed: 22, low: -1.0, high: 1.0 })?;
    let ly = y.to_array()?.into_dimensionality::<ndarray::Ix2>()?;
    let expected = dense_product(&a.transpose_view().to_csr(), &ly);
    for block_rows in [1, 7, 53, 100] {
        let s = tessera::SparseDArray::from_csr(rt(), &a, block_rows)?;
        let got = s.t_matmul(&y)?;
        ensure!(got.shape() == [41, 3], "shape {:?}", got.shape());
        let got = got.to_array()?.into_dimensionality::<ndarray::Ix2>()?;
        let worst = (&got - &expected).iter().fold(0.0f64, |w, d| w.max(d.abs()));
        ensure!(worst < 1e-12, "blocks of {block_rows}: Aᵀ·Y off by {worst}");
        let v = y.slice(&[0..53, 2..3])?.to_array()?.into_shape_with_order(53)?;
        let got = s.t_matmul(&DArray::from_array(rt(), &v, &[11])?)?.to_array()?;
        let worst = got.iter().zip(expected.column(2)).fold(0.0f64, |w, (p, q)| w.max((p - q).abs()));
        ensure!(got.shape() == [41] && worst < 1e-12, "blocks of {block_rows}: Aᵀ·v off by {worst}");
    }
    let s = tessera::SparseDArray::from_csr(rt(), &a, 10)?;
    let wrong = s.t_matmul(&DArray::<f64>::zeros(rt(), &[41], &[8])?).unwrap_err();
    ensure!(matches!(array_error(&wrong), Some(ArrayError::ShapeMismatch { .. })), "{wrong}");
    // No rows: Aᵀ·y is all zeros.
    let empty = tessera::SparseDArray::from_csr(rt(), &sprs::CsMat::<f64>::zero((0, 4)), 3)?;
    let zeros = empty.t_matmul(&DArray::<f64>::zeros(rt(), &[0], &[1])?)?.to_array()?;
    ensure!(zeros.shape() == [4] && zeros.iter().all(|&z| z == 0.0), "{zeros:?}");
    Ok(())
}

#[test]
fn sparse_times_sparse_matches_sprs_for_any_blocking() -> Result<()> {
    let a = random_csr(53, 41, 0.15, 11);
    let b = random_csr(41, 37, 0.2, 12);
    let expected = (&a * &b).to_dense();
    for (a_rows, b_rows) in [(1, 5), (7, 41), (53, 100), (100, 1), (10, 13)] {
        let sa = tessera::SparseDArray::from_csr(rt(), &a, a_rows)?;
        let sb = tessera::SparseDArray::from_csr(rt(), &b, b_rows)?;
        let product = sa.matmul_sparse(&sb)?;
        ensure!(product.shape() == [53, 37] && product.block_rows() == sa.block_rows());
        let got = product.to_csr()?;
        let worst = (&got.to_dense() - &expected).iter().fold(0.0f64, |w, d| w.max(d.abs()));
        ensure!(worst < 1e-12, "blocks of {a_rows} and {b_rows}: off by {worst}");
        ensure!(got.nnz() == (&a * &b).nnz(), "blocks of {a_rows} and {b_rows}: {} nonzeros", got.nnz());
    }
    // The Laplacian squared: the 13-point stencil of the biharmonic operator.
    let p = tessera::SparseDArray::<f64>::poisson_2d(rt(), 20, 64)?;
    let squared = p.matmul_sparse(&p)?.to_csr()?;
    let reference = p.to_csr()?;
    ensure!(squared == &reference * &reference, "Laplacian squared differs from sprs");
    ensure!(squared.outer_view(210).unwrap().nnz() == 13, "an interior row has 13 neighbours");
    // Shapes are checked, and an inner dimension of 0 gives empty rows.
    let wrong = p.matmul_sparse(&tessera::SparseDArray::from_csr(rt(), &b, 10)?).unwrap_err();
    ensure!(matches!(array_error(&wrong), Some(ArrayError::ShapeMismatch { .. })), "{wrong}");
    let thin = tessera::SparseDArray::from_csr(rt(), &sprs::CsMat::<f64>::zero((5, 0)), 2)?;
    let flat = tessera::SparseDArray::from_csr(rt(), &sprs::CsMat::<f64>::zero((0, 4)), 2)?;
    let empty = thin.matmul_sparse(&flat)?.to_csr()?;
    ensure!(empty.shape() == (5, 4) && empty.nnz() == 0, "{empty:?}");
    Ok(())
}

#[test]
fn generated_sparse_matrices_do_not_depend_on_the_blocking() -> Result<()> {
    let n = 30;
    let p = tessera::SparseDArray::<f64>::poisson_2d(rt(), n, 77)?.to_csr()?;
    ensure!(p.shape() == (n * n, n * n) && p.nnz() == 5 * n * n - 4 * n, "poisson nnz {}", p.nnz());
    ensure!(p == tessera::SparseDArray::<f64>::poisson_2d(rt(), n, 900)?.to_csr()?);
    ensure!(p.to_dense() == p.to_dense().t(), "the Laplacian is symmetric");
    let r = tessera::SparseDArray::<f32>::random(rt(), [200, 1000], 10, 4, 33)?;
    let csr = r.to_csr()?;
    ensure!(csr == tessera::SparseDArray::<f32>::random(rt(), [200, 1000], 10, 4, 200)?.to_csr()?);
    ensure!(csr.outer_iterator().all(|row| row.nnz() == 10), "10 nonzeros a row");
    ensure!(csr.data().iter().all(|v| (-1.0..1.0).contains(v)), "values in [-1, 1)");
    // Rows asking for more nonzeros than columns are full.
    let full = tessera::SparseDArray::<f32>::random(rt(), [3, 4], 9, 1, 2)?.to_csr()?;
    ensure!(full.nnz() == 12);
    Ok(())
}
