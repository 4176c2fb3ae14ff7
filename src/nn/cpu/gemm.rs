//! Single-threaded SGEMM through `matrixmultiply`, with transposes expressed as strides.

/// A matrix operand: a slice plus row and column strides (elements).
#[derive(Clone, Copy)]
pub(crate) struct MatRef<'a> {
    pub(crate) data: &'a [f32],
    pub(crate) rs: usize,
    pub(crate) cs: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major `rows × cols` matrix, read as stored.
    pub(crate) fn rows(data: &'a [f32], cols: usize) -> Self {
        MatRef { data, rs: cols, cs: 1 }
    }

    /// A row-major matrix with `cols` columns, read transposed.
    pub(crate) fn trans(data: &'a [f32], cols: usize) -> Self {
        MatRef { data, rs: 1, cs: cols }
    }

    /// Strided view.
    pub(crate) fn strided(data: &'a [f32], rs: usize, cs: usize) -> Self {
        MatRef { data, rs, cs }
    }
}

fn span(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

/// `c[m × n] (strides rsc, csc) = alpha · a[m × k] · b[k × n] + beta · c`.
///
/// Panics (an internal bug, never bad user input: shapes are checked at graph build) if
/// an operand's slice is too short for its view.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: MatRef<'_>,
    b: MatRef<'_>,
    beta: f32,
    c: &mut [f32],
    rsc: usize,
    csc: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(span(m, k, a.rs, a.cs) <= a.data.len(), "gemm: a too short");
    assert!(span(k, n, b.rs, b.cs) <= b.data.len(), "gemm: b too short");
    assert!(span(m, n, rsc, csc) <= c.len(), "gemm: c too short");
    // SAFETY: the asserts above keep every element the kernel touches inside the slices;
    // `c` is borrowed mutably and cannot alias `a` or `b`.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.data.as_ptr(),
            a.rs as isize,
            a.cs as isize,
            b.data.as_ptr(),
            b.rs as isize,
            b.cs as isize,
            beta,
            c.as_mut_ptr(),
            rsc as isize,
            csc as isize,
        );
    }
}

/// `c[m × n] (row-major) = a · b + beta · c`.
pub(crate) fn gemm_rm(m: usize, k: usize, n: usize, a: MatRef<'_>, b: MatRef<'_>, beta: f32, c: &mut [f32]) {
    gemm(m, k, n, 1.0, a, b, beta, c, n, 1);
}
