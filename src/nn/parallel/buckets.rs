//! Gradient buckets: how a graph's parameters are grouped into the buffers that data-parallel
//! training all-reduces, shared by the CPU replicas ([`DataParallel`](super::DataParallel))
//! and the GPU replicas (`GpuTrainer::replica`, feature `cuda`).
//!
//! Buckets are built from the graph's fixed parameter order, in reverse (backward finishes
//! the last parameters first), each holding whole parameters until it reaches the size
//! asked for: every replica of the same graph builds the same buckets, so their
//! collectives match.
use crate::nn::{Graph, NnError};

/// Where one parameter sits in a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slot {
    pub(crate) param: usize,
    pub(crate) offset: usize,
    pub(crate) len: usize,
}

/// Gradient buckets over a graph's parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Buckets {
    /// The parameters of each bucket, in the order they are placed.
    pub(crate) slots: Vec<Vec<Slot>>,
    /// Bucket of each parameter.
    pub(crate) of_param: Vec<usize>,
}

impl Buckets {
    /// Buckets of about `bucket_mib` MiB over `graph`'s parameters (a parameter is never
    /// split, so a bucket may be larger).
    ///
    /// # Errors
    /// [`NnError::Argument`] naming `op` if `bucket_mib` is not a positive number.
    pub(crate) fn for_graph(op: &'static str, graph: &Graph, bucket_mib: f64) -> Result<Self, NnError> {
        if !(bucket_mib > 0.0 && bucket_mib.is_finite()) {
            return Err(NnError::Argument {
                op,
                what: format!("bucket size must be a positive number of MiB, got {bucket_mib}"),
            });
        }
        let lens: Vec<usize> = graph.params().iter().map(|p| p.shape.iter().product()).collect();
        Ok(Buckets::new(&lens, ((bucket_mib * (1u64 << 20) as f64) as usize).max(4)))
    }

    fn new(param_lens: &[usize], bucket_bytes: usize) -> Self {
        let mut slots: Vec<Vec<Slot>> = Vec::new();
        let mut of_param = vec![0; param_lens.len()];
        let mut current: Vec<Slot> = Vec::new();
        let mut fill = 0usize;
        for param in (0..param_lens.len()).rev() {
            let len = param_lens[param];
            current.push(Slot { param, offset: fill, len });
            of_param[param] = slots.len();
            fill += len;
            if fill * 4 >= bucket_bytes {
                slots.push(std::mem::take(&mut current));
                fill = 0;
            }
        }
        if !current.is_empty() {
            slots.push(current);
        }
        Buckets { slots, of_param }
    }

    /// Elements of bucket `bucket`.
    pub(crate) fn len_of(&self, bucket: usize) -> usize {
        self.slots[bucket].last().map_or(0, |s| s.offset + s.len)
    }

    /// The slot of parameter `param`.
    pub(crate) fn slot_of(&self, param: usize) -> Option<Slot> {
        let bucket = *self.of_param.get(param)?;
        self.slots[bucket].iter().find(|s| s.param == param).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::Buckets;
    use crate::nn::mlp;

    #[test]
    fn buckets_take_parameters_in_reverse_and_never_split_one() {
        // 4-byte floats: a 40-byte cap holds 10 elements.
        let b = Buckets::new(&[6, 3, 8, 2, 5], 40);
        let params: Vec<Vec<usize>> = b.slots.iter().map(|s| s.iter().map(|s| s.param).collect()).collect();
        assert_eq!(params, vec![vec![4, 3, 2], vec![1, 0]]);
        assert_eq!(b.of_param, vec![1, 1, 0, 0, 0]);
        assert_eq!(b.len_of(0), 15);
        assert_eq!(b.slots[1][1].offset, 3);
        assert_eq!(b.slot_of(0).map(|s| (s.offset, s.len)), Some((3, 6)));
        assert_eq!(b.slot_of(3).map(|s| (s.offset, s.len)), Some((5, 2)));
        assert_eq!(b.slot_of(5), None);
        // A tiny cap gives one bucket per parameter.
        assert_eq!(Buckets::new(&[6, 3, 8], 4).slots.len(), 3);
        // A huge cap gives one bucket.
        assert_eq!(Buckets::new(&[6, 3, 8], 1 << 30).slots.len(), 1);
    }

    #[test]
    fn bucket_sizes_must_be_positive_mebibytes() {
        let model = mlp(4, &[3, 8, 2]).unwrap();
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let error = Buckets::for_graph("test", &model.graph, bad).unwrap_err().to_string();
            assert!(error.contains("positive number of MiB"), "{bad}: {error}");
        }
        // 3×8 + 8 + 8×2 + 2 = 50 floats: one bucket at 1 MiB, one per parameter at 4 bytes.
        let one = Buckets::for_graph("test", &model.graph, 1.0).unwrap();
        assert_eq!((one.slots.len(), one.len_of(0)), (1, 50));
        let each = Buckets::for_graph("test", &model.graph, 1e-9).unwrap();
        assert_eq!(each.slots.len(), 4);
    }
}
