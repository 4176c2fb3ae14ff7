//! `Chunk<T>`: one chunk's values as a task payload (shape, then the elements as raw
//! little-endian bytes on the wire), and the kernels that tasks run on chunks.
use std::ops::Range;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::ops::{BinaryOp, DElement, Fill, ReduceOp};
use super::ArrayError;

/// The values of one chunk, row-major. Nominally `pub` only so that the sealed kernels
/// trait of the element types can name it; it is not reachable from outside the crate.
#[derive(Debug, Clone, PartialEq)]
#[allow(unreachable_pub)]
pub struct Chunk<T> {
    pub(crate) shape: Vec<usize>,
    pub(crate) data: Shared<T>,
}

/// Elements shared between the copies of a chunk: a task's input is a copy of the value in
/// the object table, and reading it should not copy the elements. Writing through
/// `DerefMut` copies them first unless this copy is the only one (`Arc::make_mut`).
#[derive(Debug, Clone, PartialEq)]
#[allow(unreachable_pub)]
pub struct Shared<T>(Arc<Vec<T>>);

impl<T> From<Vec<T>> for Shared<T> {
    fn from(data: Vec<T>) -> Self {
        Shared(Arc::new(data))
    }
}

impl<T> std::ops::Deref for Shared<T> {
    type Target = Vec<T>;
    fn deref(&self) -> &Vec<T> {
        &self.0
    }
}

impl<T: Clone> std::ops::DerefMut for Shared<T> {
    fn deref_mut(&mut self) -> &mut Vec<T> {
        Arc::make_mut(&mut self.0)
    }
}

impl<T: DElement> Chunk<T> {
    pub(crate) fn zeros(shape: Vec<usize>) -> Chunk<T> {
        let len = shape.iter().product();
        Chunk { shape, data: vec![T::default(); len].into() }
    }
}

/// Little-endian bytes of `items`: borrowed as they are on little-endian machines (no copy:
/// counting a value's encoded size, done for every task result, serializes it).
pub(super) fn le_bytes<A: crate::ArrayElement>(items: &[A]) -> std::borrow::Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        std::borrow::Cow::Borrowed(bytemuck::cast_slice(items))
    } else {
        let mut bytes = bytemuck::cast_slice::<A, u8>(items).to_vec();
        crate::store::to_little_endian::<A>(&mut bytes);
        std::borrow::Cow::Owned(bytes)
    }
}

/// The items that little-endian `bytes` hold; `None` unless they are a whole number of them.
pub(super) fn from_le_bytes<A: crate::ArrayElement + Default>(bytes: &[u8]) -> Option<Vec<A>> {
    let size = std::mem::size_of::<A>();
    if bytes.len() % size != 0 {
        return None;
    }
    let mut items = vec![A::default(); bytes.len() / size];
    let raw = bytemuck::cast_slice_mut::<A, u8>(&mut items);
    raw.copy_from_slice(bytes);
    crate::store::to_little_endian::<A>(raw);
    Some(items)
}

impl<T: DElement> Serialize for Chunk<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeTuple;
        let mut tuple = serializer.serialize_tuple(2)?;
        tuple.serialize_element(&self.shape)?;
        tuple.serialize_element(serde_bytes::Bytes::new(&le_bytes(&self.data)))?;
        tuple.end()
    }
}

impl<'de, T: DElement> Deserialize<'de> for Chunk<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let (shape, bytes): (Vec<usize>, serde_bytes::ByteBuf) = Deserialize::deserialize(deserializer)?;
        let len = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        let expected = len.and_then(|n| n.checked_mul(std::mem::size_of::<T>()));
        let data = (expected == Some(bytes.len())).then(|| from_le_bytes::<T>(&bytes)).flatten();
        let Some(data) = data else {
            return Err(D::Error::custom(format!(
                "chunk of shape {shape:?} carries {} bytes, not {expected:?}",
                bytes.len()
            )));
        };
        Ok(Chunk { shape, data: data.into() })
    }
}

/// A chunk covering the global `region` of an array of `shape`, filled by `fill`.
pub(crate) fn fill<T: DElement>(
    shape: &[usize],
    region: &[Range<usize>],
    fill: Fill,
) -> Result<Chunk<T>, ArrayError> {
    let inside =
        region.len() == shape.len() && region.iter().zip(shape).all(|(r, &d)| r.start <= r.end && r.end <= d);
    if !inside {
        return Err(ArrayError::SliceOutOfBounds { ranges: region.to_vec(), shape: shape.to_vec() });
    }
    let chunk_shape: Vec<usize> = region.iter().map(|r| r.end - r.start).collect();
    let mut chunk = Chunk::zeros(chunk_shape);
    if let Fill::Zeros = fill {
        return Ok(chunk);
    }
    let strides = strides(shape);
    let mut index: Vec<usize> = region.iter().map(|r| r.start).collect();
    for slot in chunk.data.iter_mut() {
        let global: usize = index.iter().zip(&strides).map(|(i, s)| i * s).sum();
        *slot = T::from_f64(fill.value_at(global as u64));
        // Odometer over the region, last dimension fastest.
        for dim in (0..index.len()).rev() {
            index[dim] += 1;
            if index[dim] < region[dim].end {
                break;
            }
            index[dim] = region[dim].start;
        }
    }
    Ok(chunk)
}

/// Elementwise `a op b` of two chunks of one shape.
pub(crate) fn zip<T: DElement>(a: &Chunk<T>, b: &Chunk<T>, op: BinaryOp) -> Result<Chunk<T>, ArrayError> {
    if a.shape != b.shape {
        return Err(ArrayError::ShapeMismatch { op: "zip", left: a.shape.clone(), right: b.shape.clone() });
    }
    Ok(Chunk { shape: a.shape.clone(), data: T::zip_new(op, &a.data, &b.data).into() })
}

/// A chunk's reduction, `None` for an empty chunk under min or max.
pub(crate) fn reduce<T: DElement>(chunk: &Chunk<T>, op: ReduceOp) -> Option<T> {
    match op {
        ReduceOp::Sum => Some(T::from_f64(sum_f64(&chunk.data))),
        ReduceOp::Min => chunk.data.iter().copied().reduce(|a, b| T::binary(BinaryOp::Min, a, b)),
        ReduceOp::Max => chunk.data.iter().copied().reduce(|a, b| T::binary(BinaryOp::Max, a, b)),
    }
}

/// The sum in f64, over 8 independent lanes (so that the compiler can vectorize it).
fn sum_f64<T: DElement>(data: &[T]) -> f64 {
    let mut lanes = [0.0f64; 8];
    let mut rows = data.chunks_exact(8);
    for row in &mut rows {
        for (lane, x) in lanes.iter_mut().zip(row) {
            *lane += x.to_f64();
        }
    }
    lanes.iter().sum::<f64>() + rows.remainder().iter().map(|x| x.to_f64()).sum::<f64>()
}

/// Combines two partial reductions.
pub(crate) fn combine<T: DElement>(a: Option<T>, b: Option<T>, op: ReduceOp) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) => Some(match op {
            ReduceOp::Sum => T::binary(BinaryOp::Add, a, b),
            ReduceOp::Min => T::binary(BinaryOp::Min, a, b),
            ReduceOp::Max => T::binary(BinaryOp::Max, a, b),
        }),
        (one, None) | (None, one) => one,
    }
}

/// The matrix product of an `m×k` and a `k×n` chunk.
pub(crate) fn matmul<T: DElement>(a: &Chunk<T>, b: &Chunk<T>) -> Result<Chunk<T>, ArrayError> {
    let (&[m, k], &[k2, n]) = (a.shape.as_slice(), b.shape.as_slice()) else {
        return Err(ArrayError::RankMismatch {
            op: "matmul",
            expected: 2,
            got: a.shape.len().max(b.shape.len()),
        });
    };
    if k != k2 {
        return Err(ArrayError::ShapeMismatch {
            op: "matmul",
            left: a.shape.clone(),
            right: b.shape.clone(),
        });
    }
    let mut c = Chunk::zeros(vec![m, n]);
    T::gemm(m, k, n, &a.data, &b.data, &mut c.data);
    Ok(c)
}

/// The transpose of a 2-dimensional chunk, in blocks of 32×32 (cache-friendly).
pub(crate) fn transpose<T: DElement>(a: &Chunk<T>) -> Result<Chunk<T>, ArrayError> {
    let &[m, n] = a.shape.as_slice() else {
        return Err(ArrayError::RankMismatch { op: "transpose", expected: 2, got: a.shape.len() });
    };
    let mut out = Chunk::zeros(vec![n, m]);
    const BLOCK: usize = 32;
    for i0 in (0..m).step_by(BLOCK) {
        for j0 in (0..n).step_by(BLOCK) {
            for i in i0..(i0 + BLOCK).min(m) {
                for j in j0..(j0 + BLOCK).min(n) {
                    out.data[j * m + i] = a.data[i * n + j];
                }
            }
        }
    }
    Ok(out)
}

/// A new chunk of `shape`, zero but for `src`'s local block `from` copied to `at`.
pub(crate) fn extract<T: DElement>(
    src: &Chunk<T>,
    from: &[Range<usize>],
    shape: Vec<usize>,
    at: &[usize],
) -> Result<Chunk<T>, ArrayError> {
    // A block that is the whole source and the whole output is the source itself.
    if src.shape == shape && at.iter().all(|&a| a == 0) && from.iter().zip(&shape).all(|(r, &d)| *r == (0..d))
    {
        return Ok(src.clone());
    }
    paste(Chunk::zeros(shape), src, from, at)
}

/// `dst` with `src`'s local block `from` copied in at `at`.
pub(crate) fn paste<T: DElement>(
    mut dst: Chunk<T>,
    src: &Chunk<T>,
    from: &[Range<usize>],
    at: &[usize],
) -> Result<Chunk<T>, ArrayError> {
    let fits = |shape: &[usize], start: &[usize]| {
        shape.len() == from.len()
            && start.len() == from.len()
            && from
                .iter()
                .zip(start)
                .zip(shape)
                .all(|((r, &s), &d)| r.start <= r.end && s + (r.end - r.start) <= d)
    };
    let src_start: Vec<usize> = from.iter().map(|r| r.start).collect();
    if !fits(&src.shape, &src_start) || !fits(&dst.shape, at) {
        return Err(ArrayError::BadBlock {
            block: from.to_vec(),
            source_shape: src.shape.clone(),
            target_shape: dst.shape.clone(),
        });
    }
    let extent: Vec<usize> = from.iter().map(|r| r.end - r.start).collect();
    copy_block(&src.data, &src.shape, &src_start, &mut dst.data, &dst.shape, at, &extent);
    Ok(dst)
}

/// Row-major strides of `shape`, in elements.
pub(crate) fn strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for dim in (0..shape.len().saturating_sub(1)).rev() {
        strides[dim] = strides[dim + 1] * shape[dim + 1];
    }
    strides
}

/// Copies the block of `extent` at `src_start` in `src` (of `src_shape`) to `dst_start`
/// in `dst` (of `dst_shape`), a contiguous run of the last dimension at a time. The
/// caller checks that the block fits both.
pub(crate) fn copy_block<T: Copy>(
    src: &[T],
    src_shape: &[usize],
    src_start: &[usize],
    dst: &mut [T],
    dst_shape: &[usize],
    dst_start: &[usize],
    extent: &[usize],
) {
    if extent.contains(&0) || extent.is_empty() {
        return;
    }
    let (src_strides, dst_strides) = (strides(src_shape), strides(dst_shape));
    let last = extent.len() - 1;
    let run = extent[last];
    let mut outer = vec![0usize; last];
    loop {
        let offset = |start: &[usize], strides: &[usize]| -> usize {
            (0..last).map(|d| (start[d] + outer[d]) * strides[d]).sum::<usize>() + start[last]
        };
        let (s, d) = (offset(src_start, &src_strides), offset(dst_start, &dst_strides));
        dst[d..d + run].copy_from_slice(&src[s..s + run]);
        let mut dim = last;
        loop {
            if dim == 0 {
                return;
            }
            dim -= 1;
            outer[dim] += 1;
            if outer[dim] < extent[dim] {
                break;
            }
            outer[dim] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_round_trip_through_bincode_and_reject_a_short_body() {
        let chunk = Chunk { shape: vec![2, 3], data: vec![1.5f32, -2.0, 3.0, 0.0, 1e-7, f32::MAX].into() };
        let bytes = bincode::serde::encode_to_vec(&chunk, bincode::config::standard()).unwrap();
        let (back, _): (Chunk<f32>, _) =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).unwrap();
        assert_eq!(back, chunk);
        let lying = Chunk { shape: vec![2, 4], data: chunk.data.clone() };
        let bytes = bincode::serde::encode_to_vec(&lying, bincode::config::standard()).unwrap();
        let decoded = bincode::serde::decode_from_slice::<Chunk<f32>, _>(&bytes, bincode::config::standard());
        assert!(decoded.unwrap_err().to_string().contains("carries 24 bytes"));
    }

    #[test]
    fn paste_copies_a_3d_block_and_refuses_one_that_does_not_fit() {
        let src: Chunk<f64> =
            Chunk { shape: vec![2, 3, 4], data: (0..24).map(f64::from).collect::<Vec<_>>().into() };
        let out = extract(&src, &[1..2, 1..3, 2..4], vec![1, 2, 3], &[0, 0, 1]).unwrap();
        assert_eq!(*out.data, vec![0.0, 18.0, 19.0, 0.0, 22.0, 23.0]);
        let err = paste(Chunk::zeros(vec![1, 2, 2]), &src, &[0..1, 0..2, 0..3], &[0, 0, 0]).unwrap_err();
        assert!(matches!(err, ArrayError::BadBlock { .. }), "{err}");
    }
}
