//! The compact array layout: a small header (magic, dtype, shape) followed by the
//! elements as raw little-endian bytes, read and written without a generic encoding.
//!
//! Header: `b"TSAR"`, format byte 1, dtype byte, ndim (u16 LE), then `ndim` u64 LE
//! dimensions. The elements follow in row-major (C) order.
use std::any::{Any, TypeId};
use std::borrow::Cow;
use std::fmt;

use ndarray::{Array, ArrayBase, Data, Dimension, IxDyn};
use serde::{Deserialize, Serialize};

const MAGIC: &[u8; 4] = b"TSAR";
const FORMAT: u8 = 1;

/// The element type of a stored array.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
#[allow(missing_docs)]
pub enum Dtype {
    F32,
    F64,
    I8,
    I16,
    I32,
    I64,
    U8,
    U16,
    U32,
    U64,
}

impl Dtype {
    fn code(self) -> u8 {
        self as u8
    }

    fn from_code(code: u8) -> Option<Dtype> {
        use Dtype::*;
        [F32, F64, I8, I16, I32, I64, U8, U16, U32, U64].get(code as usize).copied()
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        use Dtype::*;
        match self {
            I8 | U8 => 1,
            I16 | U16 => 2,
            F32 | I32 | U32 => 4,
            F64 | I64 | U64 => 8,
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = format!("{self:?}").to_lowercase();
        f.write_str(&s)
    }
}

mod sealed {
    pub trait Sealed {}
}

/// An element type the stash stores in the compact array layout.
pub trait ArrayElement: bytemuck::Pod + sealed::Sealed + Send + Sync + 'static {
    /// The tag stored in the header.
    const DTYPE: Dtype;
}

macro_rules! elements {
    ($($t:ty => $d:ident),*) => {$(
        impl sealed::Sealed for $t {}
        impl ArrayElement for $t { const DTYPE: Dtype = Dtype::$d; }
    )*};
}
elements!(f32 => F32, f64 => F64, i8 => I8, i16 => I16, i32 => I32, i64 => I64,
          u8 => U8, u16 => U16, u32 => U32, u64 => U64);

/// The type name recorded for arrays: `ndarray<f32>`.
pub(crate) fn array_type_name(dtype: Dtype) -> String {
    format!("ndarray<{dtype}>")
}

pub(crate) fn encode_header(dtype: Dtype, shape: &[usize]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + 8 * shape.len());
    out.extend_from_slice(MAGIC);
    out.push(FORMAT);
    out.push(dtype.code());
    out.extend_from_slice(&(shape.len() as u16).to_le_bytes());
    for &d in shape {
        out.extend_from_slice(&(d as u64).to_le_bytes());
    }
    out
}

/// Parses a header; returns the dtype and shape, or why it is not one.
pub(crate) fn decode_header(bytes: &[u8]) -> Result<(Dtype, Vec<u64>), String> {
    if bytes.len() < 8 || &bytes[..4] != MAGIC {
        return Err("bad array header magic".into());
    }
    if bytes[4] != FORMAT {
        return Err(format!("unknown array format {}", bytes[4]));
    }
    let dtype = Dtype::from_code(bytes[5]).ok_or_else(|| format!("unknown dtype code {}", bytes[5]))?;
    let ndim = u16::from_le_bytes([bytes[6], bytes[7]]) as usize;
    if bytes.len() != 8 + 8 * ndim {
        return Err(format!("array header is {} bytes, {ndim} dims need {}", bytes.len(), 8 + 8 * ndim));
    }
    let shape = bytes[8..]
        .chunks_exact(8)
        .map(|d| u64::from_le_bytes(d.try_into().expect("chunks_exact(8)")))
        .collect();
    Ok((dtype, shape))
}

/// An array's bytes ready to store: header and little-endian elements.
pub(crate) struct ArrayBytes<'a> {
    pub(crate) dtype: Dtype,
    pub(crate) shape: Vec<usize>,
    pub(crate) header: Vec<u8>,
    pub(crate) body: Cow<'a, [u8]>,
}

pub(crate) fn array_bytes<A, S, D>(array: &ArrayBase<S, D>) -> ArrayBytes<'_>
where
    A: ArrayElement,
    S: Data<Elem = A>,
    D: Dimension,
{
    let shape = array.shape().to_vec();
    let body: Cow<'_, [A]> = match array.as_slice() {
        Some(slice) => Cow::Borrowed(slice),
        None => Cow::Owned(array.iter().copied().collect()),
    };
    let body: Cow<'_, [u8]> = match body {
        Cow::Borrowed(slice) if cfg!(target_endian = "little") => Cow::Borrowed(bytemuck::cast_slice(slice)),
        other => {
            let mut bytes = bytemuck::cast_slice::<A, u8>(&other).to_vec();
            to_little_endian::<A>(&mut bytes);
            Cow::Owned(bytes)
        }
    };
    ArrayBytes { dtype: A::DTYPE, header: encode_header(A::DTYPE, &shape), shape, body }
}

/// Converts native-endian element bytes to little-endian in place (and back: it is an involution).
pub(crate) fn to_little_endian<A: ArrayElement>(bytes: &mut [u8]) {
    if cfg!(target_endian = "big") {
        for element in bytes.chunks_exact_mut(std::mem::size_of::<A>()) {
            element.reverse();
        }
    }
}

/// Builds an owned array from its shape and its elements.
pub(crate) fn build_array<A: ArrayElement, D: Dimension>(
    shape: &[u64],
    elements: Vec<A>,
) -> Result<Array<A, D>, String> {
    let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
    let array = Array::from_shape_vec(IxDyn(&shape), elements).map_err(|e| e.to_string())?;
    array.into_dimensionality::<D>().map_err(|e| e.to_string())
}

/// If `value` is an owned ndarray of a supported element type, its array bytes.
pub(crate) fn detect_array(value: &dyn Any) -> Option<ArrayBytes<'_>> {
    macro_rules! try_types {
        ($($a:ty),*) => {$(
            if let Some(bytes) = detect_dims::<$a>(value) {
                return Some(bytes);
            }
        )*};
    }
    try_types!(f32, f64, i8, i16, i32, i64, u8, u16, u32, u64);
    None
}

fn detect_dims<A: ArrayElement>(value: &dyn Any) -> Option<ArrayBytes<'_>> {
    use ndarray::{Ix0, Ix1, Ix2, Ix3, Ix4, Ix5, Ix6};
    macro_rules! try_dims {
        ($($d:ty),*) => {$(
            if let Some(array) = value.downcast_ref::<Array<A, $d>>() {
                return Some(array_bytes(array));
            }
        )*};
    }
    try_dims!(IxDyn, Ix0, Ix1, Ix2, Ix3, Ix4, Ix5, Ix6);
    None
}

/// If `T` is an owned ndarray of a supported element type: its dtype and, for a fixed
/// dimension type, its number of dimensions.
pub(crate) fn array_kind<T: 'static>() -> Option<(Dtype, Option<usize>)> {
    macro_rules! try_types {
        ($($a:ty),*) => {$(
            if let Some(ndim) = kind_dims::<T, $a>() {
                return Some((<$a as ArrayElement>::DTYPE, ndim));
            }
        )*};
    }
    try_types!(f32, f64, i8, i16, i32, i64, u8, u16, u32, u64);
    None
}

/// `Some(ndim)` when `T` is `Array<A, D>`: `Some(None)` for `IxDyn`, `Some(Some(n))` for `IxN`.
fn kind_dims<T: 'static, A: ArrayElement>() -> Option<Option<usize>> {
    use ndarray::{Ix0, Ix1, Ix2, Ix3, Ix4, Ix5, Ix6};
    let t = TypeId::of::<T>();
    if t == TypeId::of::<Array<A, IxDyn>>() {
        return Some(None);
    }
    macro_rules! try_dims {
        ($($d:ty => $n:expr),*) => {$(
            if t == TypeId::of::<Array<A, $d>>() {
                return Some(Some($n));
            }
        )*};
    }
    try_dims!(Ix0 => 0, Ix1 => 1, Ix2 => 2, Ix3 => 3, Ix4 => 4, Ix5 => 5, Ix6 => 6);
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let h = encode_header(Dtype::F32, &[3, 4, 5]);
        assert_eq!(decode_header(&h).unwrap(), (Dtype::F32, vec![3, 4, 5]));
        assert!(decode_header(&h[..h.len() - 1]).is_err());
        assert!(decode_header(b"nonsense").is_err());
    }

    #[test]
    fn detects_arrays_by_type() {
        let a = ndarray::Array2::<f32>::zeros((2, 3));
        let bytes = detect_array(&a).unwrap();
        assert_eq!(bytes.dtype, Dtype::F32);
        assert_eq!(bytes.body.len(), 24);
        assert!(detect_array(&vec![1.0f32]).is_none());
        assert_eq!(array_kind::<ndarray::ArrayD<u8>>(), Some((Dtype::U8, None)));
        assert_eq!(array_kind::<ndarray::Array3<i64>>(), Some((Dtype::I64, Some(3))));
        assert_eq!(array_kind::<Vec<f32>>(), None);
    }
}
