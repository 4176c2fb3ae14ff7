//! Gradient averaging between data-parallel GPU replicas
//! ([`GpuTrainer::replica`](super::GpuTrainer::replica)): after backward, each gradient
//! bucket is gathered into a device buffer, summed over the replicas through a
//! [`GpuCommunicator`] (NCCL, or a host group staged through host memory) and written back,
//! divided by the group size, before the optimizer update.
//!
//! # Invariants
//! 1. Every replica builds the same buckets from the graph (the CPU replicas' buckets) and
//!    reduces them in bucket order, so the collectives match on every rank.
//! 2. The copies, the reduction and the averaging are queued on the GPU's one stream after
//!    backward and before the update: with NCCL the host does not wait for any of it.
//! 3. Every average is `0 + (1 / size) · sum`, computed alike on every replica, so replicas
//!    that start equal stay bit-identical.
//!
//! Timing ([`CommStats`]): each step records three GPU events on the stream (its start, the
//! end of backward, the end of the averaging); they are read when the host has waited for
//! the GPU anyway (the end of a step or an epoch), so timing adds no wait of its own.
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaSlice};

use super::GpuExecutor;
use crate::devices::{launch, len_u32, Gpu, GpuCommunicator};
use crate::nn::parallel::{Buckets, CommStats};
use crate::nn::{Graph, NnError};

/// Steps whose events may wait unread before the oldest are read (a wait for a step long
/// finished): bounds the events of a caller that steps without ever reading a loss.
const UNREAD_STEPS: usize = 256;

/// A replica's group and its gradient buckets on the device.
pub(super) struct GradientSync {
    group: Box<dyn GpuCommunicator>,
    buckets: Buckets,
    /// One device buffer per bucket (at least one element, as every device buffer).
    buffers: Vec<CudaSlice<f32>>,
    /// Events of the steps queued since the last reading: start, end of backward, end of
    /// the averaging.
    unread: Vec<[CudaEvent; 3]>,
    /// Events already read, to record again.
    spare: Vec<CudaEvent>,
    /// Steps and GPU time read so far.
    stats: CommStats,
}

impl std::fmt::Debug for GradientSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GradientSync")
            .field("rank", &self.group.rank())
            .field("size", &self.group.size())
            .field("buckets", &self.buckets.slots.len())
            .finish()
    }
}

impl GradientSync {
    /// Buckets of about `bucket_mib` MiB over `graph`'s parameters, on `group`'s GPU.
    ///
    /// # Errors
    /// [`NnError::Argument`] if `bucket_mib` is not a positive number; [`NnError::Device`].
    pub(super) fn new(
        group: Box<dyn GpuCommunicator>,
        graph: &Graph,
        bucket_mib: f64,
    ) -> Result<Self, NnError> {
        let buckets = Buckets::for_graph("GpuTrainer::replica", graph, bucket_mib)?;
        let gpu = group.gpu().clone();
        let buffers = (0..buckets.slots.len())
            .map(|b| gpu.zeros(buckets.len_of(b).max(1)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(GradientSync {
            group,
            buckets,
            buffers,
            unread: Vec::new(),
            spare: Vec::new(),
            stats: CommStats::default(),
        })
    }

    /// The group, for the collectives outside a step (the start's broadcast, the epoch's
    /// statistics).
    pub(super) fn group(&mut self) -> &mut dyn GpuCommunicator {
        &mut *self.group
    }

    /// This replica's rank and the group's size.
    pub(super) fn rank_and_size(&self) -> (usize, usize) {
        (self.group.rank(), self.group.size())
    }

    /// Replaces every parameter gradient in `exec` by its average over the group.
    ///
    /// # Errors
    /// [`NnError::Collective`] if a replica or the backend failed (the group is then out of
    /// step); [`NnError::Device`].
    pub(super) fn average(&mut self, exec: &mut GpuExecutor) -> Result<(), NnError> {
        let gpu = exec.gpu().clone();
        let gpu = &*gpu;
        let scale = 1.0 / self.group.size() as f32;
        for (slots, buffer) in self.buckets.slots.iter().zip(&mut self.buffers) {
            for slot in slots.iter().filter(|s| s.len > 0) {
                let Some(grad) = exec.param_grad_mut(slot.param) else { continue };
                let mut part = buffer.slice_mut(slot.offset..slot.offset + slot.len);
                gpu.stream_ref()
                    .memcpy_dtod(&grad.slice(0..slot.len), &mut part)
                    .map_err(|e| gpu.driver(e))?;
            }
            self.group.all_reduce_device(buffer)?;
            for slot in slots.iter().filter(|s| s.len > 0) {
                let Some(grad) = exec.param_grad_mut(slot.param) else { continue };
                let n = len_u32(slot.len, "GpuTrainer::replica")?;
                let part = buffer.slice(slot.offset..slot.offset + slot.len);
                let mut grad = grad.slice_mut(0..slot.len);
                launch!(gpu, "fill_f32", n; &mut grad, &0.0f32, &n)?;
                launch!(gpu, "axpy_f32", n; &scale, &part, &mut grad, &n)?;
            }
        }
        Ok(())
    }

    /// An event recorded now on `gpu`'s stream (a spare one when there is one).
    ///
    /// # Errors
    /// [`NnError::Device`].
    pub(super) fn mark(&mut self, gpu: &Gpu) -> Result<CudaEvent, NnError> {
        let stream = gpu.stream_ref();
        let event = match self.spare.pop() {
            Some(event) => event.record(stream).map(|()| event),
            None => stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)),
        };
        event.map_err(|e| gpu.driver(e).into())
    }

    /// Keeps a step's events (its start, the end of backward, the end of the averaging) to
    /// read later; reads the oldest steps' if too many are unread.
    ///
    /// # Errors
    /// [`NnError::Device`].
    pub(super) fn queued_step(&mut self, gpu: &Gpu, marks: [CudaEvent; 3]) -> Result<(), NnError> {
        self.unread.push(marks);
        if self.unread.len() > UNREAD_STEPS {
            self.read_marks(gpu, UNREAD_STEPS / 2)?;
        }
        Ok(())
    }

    /// Adds the GPU time of every unread step to the statistics (waits for those steps:
    /// call it when the host has waited for the GPU anyway).
    ///
    /// # Errors
    /// [`NnError::Device`].
    pub(super) fn read_all_marks(&mut self, gpu: &Gpu) -> Result<(), NnError> {
        self.read_marks(gpu, self.unread.len())
    }

    fn read_marks(&mut self, gpu: &Gpu, steps: usize) -> Result<(), NnError> {
        for [start, backward_done, averaged] in self.unread.drain(..steps) {
            let compute = start.elapsed_ms(&backward_done).map_err(|e| gpu.driver(e))?;
            let averaging = backward_done.elapsed_ms(&averaged).map_err(|e| gpu.driver(e))?;
            self.stats.steps += 1;
            self.stats.compute_seconds += f64::from(compute) / 1e3;
            // Nothing overlaps backward: all of the averaging is waited for.
            self.stats.reduce_seconds += f64::from(averaging) / 1e3;
            self.stats.wait_seconds += f64::from(averaging) / 1e3;
            self.spare.extend([start, backward_done, averaged]);
        }
        Ok(())
    }

    /// Steps and GPU time read so far.
    pub(super) fn stats(&self) -> CommStats {
        self.stats
    }
}
