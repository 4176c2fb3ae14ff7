//! `ChunkGrid`: how an n-dimensional shape is cut into a regular grid of chunks, and the
//! index arithmetic over it (chunk extents, row-major chunk order, region overlaps).
use std::ops::Range;

use serde::{Deserialize, Serialize};

use super::ArrayError;

/// Most elements one array may hold: 2⁴⁸ (a larger shape is a mistake, not a plan).
const MAX_ELEMENTS: u128 = 1 << 48;

/// A shape cut into chunks of `chunk` elements along each dimension; the last chunk
/// along a dimension may be shorter. Chunks are numbered in row-major (C) order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkGrid {
    shape: Vec<usize>,
    chunk: Vec<usize>,
    /// Chunks along each dimension.
    counts: Vec<usize>,
}

impl ChunkGrid {
    /// A grid over `shape` with chunks of `chunk`. A chunk dimension larger than the
    /// array's is cut to it.
    ///
    /// # Errors
    /// [`ArrayError::BadChunkShape`] if the ranks differ or a chunk dimension is 0;
    /// [`ArrayError::TooLarge`] beyond 2⁴⁸ elements.
    pub fn new(shape: &[usize], chunk: &[usize]) -> Result<ChunkGrid, ArrayError> {
        if shape.len() != chunk.len() || shape.is_empty() || chunk.contains(&0) {
            return Err(ArrayError::BadChunkShape { shape: shape.to_vec(), chunk: chunk.to_vec() });
        }
        let elements = shape.iter().try_fold(1u128, |n, &d| n.checked_mul(d as u128));
        if elements.is_none_or(|n| n > MAX_ELEMENTS) {
            return Err(ArrayError::TooLarge { shape: shape.to_vec() });
        }
        let chunk: Vec<usize> = chunk.iter().zip(shape).map(|(&c, &s)| c.min(s.max(1))).collect();
        let counts = shape.iter().zip(&chunk).map(|(&s, &c)| s.div_ceil(c)).collect();
        Ok(ChunkGrid { shape: shape.to_vec(), chunk, counts })
    }

    /// The array's shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The shape of a full chunk.
    pub fn chunk_shape(&self) -> &[usize] {
        &self.chunk
    }

    /// Chunks along each dimension.
    pub fn chunk_counts(&self) -> &[usize] {
        &self.counts
    }

    /// How many chunks there are (0 for an empty array).
    pub fn num_chunks(&self) -> usize {
        self.counts.iter().product()
    }

    /// How many elements the array holds.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the array holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The tiles of the matrix product `self · right` of two 2-dimensional grids whose inner
    /// chunks line up: the product's grid (`self`'s row chunks, `right`'s column chunks) and
    /// the tile counts `[rows, depth, cols]`.
    ///
    /// # Errors
    /// [`ArrayError::TooLarge`] if the product's shape is.
    pub(crate) fn product_tiles(&self, right: &ChunkGrid) -> Result<(ChunkGrid, [usize; 3]), ArrayError> {
        let grid = ChunkGrid::new(&[self.shape[0], right.shape[1]], &[self.chunk[0], right.chunk[1]])?;
        Ok((grid, [self.counts[0], self.counts[1], right.counts[1]]))
    }

    /// The grid of the transpose of a 2-dimensional grid, and for each of its chunks
    /// (row-major) the number of the chunk of `self` it is the transpose of.
    ///
    /// # Errors
    /// [`ArrayError::RankMismatch`] unless the grid is 2-dimensional.
    pub(crate) fn transposed(&self) -> Result<(ChunkGrid, Vec<usize>), ArrayError> {
        let (&[m, n], &[cm, cn]) = (&self.shape[..], &self.chunk[..]) else {
            return Err(ArrayError::RankMismatch { op: "transpose", expected: 2, got: self.shape.len() });
        };
        let grid = ChunkGrid::new(&[n, m], &[cn, cm])?;
        let sources = (0..grid.num_chunks())
            .map(|c| {
                let position = grid.position(c);
                self.linear(&[position[1], position[0]])
            })
            .collect();
        Ok((grid, sources))
    }

    /// The grid position of chunk number `linear` (row-major).
    pub(crate) fn position(&self, mut linear: usize) -> Vec<usize> {
        let mut position = vec![0; self.counts.len()];
        for (slot, &count) in position.iter_mut().zip(&self.counts).rev() {
            *slot = linear % count;
            linear /= count;
        }
        position
    }

    /// The chunk number (row-major) of grid position `position`.
    pub(crate) fn linear(&self, position: &[usize]) -> usize {
        position.iter().zip(&self.counts).fold(0, |acc, (&p, &count)| acc * count + p)
    }

    /// The global index ranges that chunk number `linear` covers.
    pub(crate) fn region(&self, linear: usize) -> Vec<Range<usize>> {
        self.position(linear)
            .iter()
            .zip(self.chunk.iter().zip(&self.shape))
            .map(|(&p, (&c, &s))| p * c..((p + 1) * c).min(s))
            .collect()
    }

    /// The numbers of the chunks that overlap the global `region`, each with the overlap.
    pub(crate) fn overlapping(&self, region: &[Range<usize>]) -> Vec<(usize, Vec<Range<usize>>)> {
        if region.iter().any(|r| r.is_empty()) {
            return Vec::new();
        }
        // The range of grid positions along each dimension.
        let spans: Vec<Range<usize>> =
            region.iter().zip(&self.chunk).map(|(r, &c)| r.start / c..(r.end - 1) / c + 1).collect();
        let mut out = Vec::new();
        let mut position: Vec<usize> = spans.iter().map(|s| s.start).collect();
        loop {
            let linear = self.linear(&position);
            let overlap = self
                .region(linear)
                .iter()
                .zip(region)
                .map(|(a, b)| a.start.max(b.start)..a.end.min(b.end))
                .collect();
            out.push((linear, overlap));
            // Odometer over the spans, last dimension fastest.
            let mut dim = position.len();
            loop {
                if dim == 0 {
                    return out;
                }
                dim -= 1;
                position[dim] += 1;
                if position[dim] < spans[dim].end {
                    break;
                }
                position[dim] = spans[dim].start;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uneven_chunks_cover_the_shape_once() {
        let grid = ChunkGrid::new(&[5, 7], &[2, 3]).unwrap();
        assert_eq!(grid.chunk_counts(), &[3, 3]);
        assert_eq!(grid.num_chunks(), 9);
        let mut covered = vec![0u8; 35];
        for c in 0..grid.num_chunks() {
            assert_eq!(grid.linear(&grid.position(c)), c);
            let r = grid.region(c);
            for i in r[0].clone() {
                for j in r[1].clone() {
                    covered[i * 7 + j] += 1;
                }
            }
        }
        assert!(covered.iter().all(|&n| n == 1), "{covered:?}");
        assert_eq!(grid.region(8), vec![4..5, 6..7]);
    }

    #[test]
    fn overlapping_finds_exactly_the_chunks_a_region_touches() {
        let grid = ChunkGrid::new(&[10, 10], &[4, 4]).unwrap();
        let hits = grid.overlapping(&[3..5, 7..10]);
        assert_eq!(
            hits,
            vec![
                (1, vec![3..4, 7..8]),
                (2, vec![3..4, 8..10]),
                (4, vec![4..5, 7..8]),
                (5, vec![4..5, 8..10])
            ]
        );
        assert!(grid.overlapping(&[3..3, 0..10]).is_empty());
        assert_eq!(grid.overlapping(&[0..10, 0..10]).len(), 9);
    }

    #[test]
    fn bad_chunk_shapes_are_errors() {
        assert!(matches!(ChunkGrid::new(&[4, 4], &[0, 2]), Err(ArrayError::BadChunkShape { .. })));
        assert!(matches!(ChunkGrid::new(&[4, 4], &[2]), Err(ArrayError::BadChunkShape { .. })));
        assert!(matches!(ChunkGrid::new(&[], &[]), Err(ArrayError::BadChunkShape { .. })));
        assert!(matches!(ChunkGrid::new(&[1 << 30, 1 << 30], &[1, 1]), Err(ArrayError::TooLarge { .. })));
        // A chunk larger than the array is cut to it.
        assert_eq!(ChunkGrid::new(&[3, 0], &[8, 8]).unwrap().chunk_shape(), &[3, 1]);
    }
}
