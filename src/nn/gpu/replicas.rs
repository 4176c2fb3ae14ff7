//! Gradient averaging between data-parallel GPU replicas
//! ([`GpuTrainer::replica`](super::GpuTrainer::replica)): each gradient bucket is gathered
//! into a device buffer, summed over the replicas through a [`GpuCommunicator`] and written
//! back, divided by the group size, before the optimizer update.
//!
//! With a group that has a stream of its own (NCCL), the buckets are reduced there *during*
//! backward: as soon as backward has queued the last kernel touching a bucket's gradients,
//! the bucket is copied on the main stream, the group stream waits for that copy (an event)
//! and queues the sum and the write-back, while the main stream goes on with the rest of
//! backward. After backward the main stream waits for the group stream (an event), then
//! updates. A group without one (a host group staged through host memory) makes the host
//! wait at each collective, so its buckets are reduced after backward instead.
//!
//! # Invariants
//! 1. Every replica builds the same buckets from the graph (the CPU replicas' buckets) and
//!    reduces them in the same order (the order in which backward completes them), so the
//!    collectives match on every rank.
//! 2. Nothing makes the host wait for the GPU with NCCL; the two streams are ordered by
//!    events only: a bucket's reduction waits for its copy, and the main stream waits for
//!    every reduction before anything it queues later (the update, the next step's copies
//!    into the buckets, frees). A step that fails part-way still queues that last wait.
//! 3. Every average is `0 + (1 / size) · sum`, computed alike on every replica and in both
//!    ways above, so replicas that start equal stay bit-identical.
//!
//! Timing ([`CommStats`]): each step records GPU events (its start, the end of backward,
//! the end of the averaging, and each bucket's reduction on the group stream); they are
//! read when the host has waited for the GPU anyway (the end of a step or an epoch), so
//! timing adds no wait of its own.
use std::sync::Arc;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream};

use super::GpuExecutor;
use crate::devices::{launch, len_u32, Gpu, GpuCommunicator};
use crate::nn::parallel::{Buckets, CommStats, Slot};
use crate::nn::{Graph, NnError, NodeId, Params};

/// Steps whose events may wait unread before the oldest are read (a wait for a step long
/// finished): bounds the events of a caller that steps without ever reading a loss.
const UNREAD_STEPS: usize = 256;

/// A step's timing events.
struct StepMarks {
    start: CudaEvent,
    backward_done: CudaEvent,
    averaged: CudaEvent,
    /// Each bucket's reduction on the group stream: (started, written back). Empty when the
    /// buckets were reduced after backward.
    buckets: Vec<(CudaEvent, CudaEvent)>,
}

/// A replica's group and its gradient buckets on the device.
pub(super) struct GradientSync {
    group: Box<dyn GpuCommunicator>,
    /// The group's own stream, when buckets are reduced during backward.
    group_stream: Option<Arc<CudaStream>>,
    buckets: Buckets,
    /// One device buffer per bucket (at least one element, as every device buffer).
    buffers: Vec<CudaSlice<f32>>,
    /// Parameters of each bucket whose gradients backward has yet to finish (this step).
    remaining: Vec<usize>,
    /// Recorded on the main stream after a bucket's copy, for the group stream to wait for
    /// (a wait takes the event as last recorded, so one event serves every bucket).
    copied: CudaEvent,
    /// The buckets' reduction events of the step being queued.
    bucket_marks: Vec<(CudaEvent, CudaEvent)>,
    /// Events of the steps queued since the last reading.
    unread: Vec<StepMarks>,
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
            .field("during_backward", &self.group_stream.is_some())
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
        let copied = gpu
            .stream_ref()
            .record_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING))
            .map_err(|e| gpu.driver(e))?;
        Ok(GradientSync {
            group_stream: group.group_stream().cloned(),
            group,
            remaining: vec![0; buckets.slots.len()],
            buckets,
            buffers,
            copied,
            bucket_marks: Vec::new(),
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

    /// Queues backward over `range` from `seeds` and the averaging of every parameter
    /// gradient over the group (during backward when the group has a stream of its own);
    /// `start` is the step's first event. When this returns, the main stream's later work
    /// comes after the averaging.
    ///
    /// # Errors
    /// As [`GpuExecutor::backward_observed`]; [`NnError::Collective`] if a replica or the
    /// backend failed (the group is then out of step); [`NnError::Device`].
    pub(super) fn backward_and_average(
        &mut self,
        exec: &mut GpuExecutor,
        params: &Params,
        range: std::ops::Range<usize>,
        seeds: &[(NodeId, &[f32])],
        start: CudaEvent,
    ) -> Result<(), NnError> {
        let gpu = exec.gpu().clone();
        self.spare.extend(self.bucket_marks.drain(..).flat_map(|(a, b)| [a, b]));
        let Some(group_stream) = self.group_stream.clone() else {
            exec.backward_observed(params, range, seeds, &mut |_, _| Ok(()))?;
            let backward_done = self.mark(&gpu, gpu.stream_ref())?;
            self.average_after_backward(exec)?;
            let averaged = self.mark(&gpu, gpu.stream_ref())?;
            return self.queued_step(&gpu, StepMarks { start, backward_done, averaged, buckets: Vec::new() });
        };
        for (remaining, slots) in self.remaining.iter_mut().zip(&self.buckets.slots) {
            *remaining = slots.len();
        }
        let queued = exec.backward_observed(params, range, seeds, &mut |exec, param| {
            let Some(&bucket) = self.buckets.of_param.get(param) else { return Ok(()) };
            // Backward reports each parameter once: the bucket's last one completes it.
            if self.remaining[bucket] == 1 {
                self.reduce_bucket(exec, &group_stream, bucket)?;
            }
            self.remaining[bucket] = self.remaining[bucket].saturating_sub(1);
            Ok(())
        });
        let backward_done = self.mark(&gpu, gpu.stream_ref());
        // Whatever failed, the main stream's later work (frees included) waits for what
        // the group stream was given.
        let averaged = self.mark(&gpu, &group_stream);
        let waited = match &averaged {
            Ok(averaged) => gpu.stream_ref().wait(averaged).map_err(|e| NnError::from(gpu.driver(e))),
            Err(_) => group_stream.synchronize().map_err(|e| gpu.driver(e).into()),
        };
        queued?;
        let (backward_done, averaged) = (backward_done?, averaged?);
        waited?;
        let buckets = std::mem::take(&mut self.bucket_marks);
        self.queued_step(&gpu, StepMarks { start, backward_done, averaged, buckets })
    }

    /// Queues bucket `bucket`'s reduction on the group stream: its gradients are final on
    /// the main stream.
    fn reduce_bucket(
        &mut self,
        exec: &mut GpuExecutor,
        group_stream: &Arc<CudaStream>,
        bucket: usize,
    ) -> Result<(), NnError> {
        let gpu = exec.gpu().clone();
        let gpu = &*gpu;
        let driver = |e| NnError::from(gpu.driver(e));
        gather(gpu, &self.buckets.slots[bucket], &mut self.buffers[bucket], exec)?;
        self.copied.record(gpu.stream_ref()).map_err(driver)?;
        group_stream.wait(&self.copied).map_err(driver)?;
        let started = self.mark(gpu, group_stream)?;
        let scale = 1.0 / self.group.size() as f32;
        let (slots, buffer) = (&self.buckets.slots[bucket], &mut self.buffers[bucket]);
        let written = self
            .group
            .all_reduce_on_group_stream(buffer)
            .map_err(NnError::from)
            .and_then(|()| write_back(gpu, group_stream, slots, buffer, exec, scale));
        // Even after a failure, so that the events stay paired.
        let finished = self.mark(gpu, group_stream)?;
        self.bucket_marks.push((started, finished));
        written
    }

    /// Replaces every parameter gradient in `exec` by its average over the group, bucket by
    /// bucket after backward, on the main stream (a group whose collectives make the host
    /// wait).
    fn average_after_backward(&mut self, exec: &mut GpuExecutor) -> Result<(), NnError> {
        let gpu = exec.gpu().clone();
        let gpu = &*gpu;
        let scale = 1.0 / self.group.size() as f32;
        for (slots, buffer) in self.buckets.slots.iter().zip(&mut self.buffers) {
            gather(gpu, slots, buffer, exec)?;
            self.group.all_reduce_device(buffer)?;
            write_back(gpu, gpu.stream_ref(), slots, buffer, exec, scale)?;
        }
        Ok(())
    }

    /// Makes the main stream's later work wait for everything queued on the group stream
    /// (before the replica's buffers are freed, when a step may have failed part-way).
    pub(super) fn settle(&self, gpu: &Gpu) {
        if let Some(group_stream) = &self.group_stream {
            let ordered = group_stream
                .record_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING))
                .and_then(|done| gpu.stream_ref().wait(&done));
            if ordered.is_err() {
                // Cannot order the streams: wait for the group stream instead.
                let _ = group_stream.synchronize();
            }
        }
    }

    /// An event recorded now on `stream`, a stream of `gpu` (a spare one when there is one).
    ///
    /// # Errors
    /// [`NnError::Device`].
    pub(super) fn mark(&mut self, gpu: &Gpu, stream: &Arc<CudaStream>) -> Result<CudaEvent, NnError> {
        let event = match self.spare.pop() {
            Some(event) => event.record(stream).map(|()| event),
            None => stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)),
        };
        event.map_err(|e| gpu.driver(e).into())
    }

    /// Keeps a step's events to read later; reads the oldest steps' if too many are unread.
    ///
    /// # Errors
    /// [`NnError::Device`].
    fn queued_step(&mut self, gpu: &Gpu, marks: StepMarks) -> Result<(), NnError> {
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
        let seconds = |from: &CudaEvent, to: &CudaEvent| {
            from.elapsed_ms(to).map(|ms| f64::from(ms.max(0.0)) / 1e3).map_err(|e| gpu.driver(e))
        };
        for marks in self.unread.drain(..steps) {
            let StepMarks { start, backward_done, averaged, buckets } = marks;
            self.stats.steps += 1;
            self.stats.compute_seconds += seconds(&start, &backward_done)?;
            // What the main stream waited for after backward: all of the averaging when it
            // came after backward, else what of it did not overlap.
            let waited = seconds(&backward_done, &averaged)?;
            self.stats.wait_seconds += waited;
            if buckets.is_empty() {
                self.stats.reduce_seconds += waited;
            }
            for (started, finished) in buckets {
                self.stats.reduce_seconds += seconds(&started, &finished)?;
                self.spare.extend([started, finished]);
            }
            self.spare.extend([start, backward_done, averaged]);
        }
        Ok(())
    }

    /// Steps and GPU time read so far.
    pub(super) fn stats(&self) -> CommStats {
        self.stats
    }
}

/// Copies the gradients of a bucket's parameters (`slots`) into `buffer`, on the main
/// stream.
///
/// # Errors
/// [`NnError::Device`].
fn gather(
    gpu: &Gpu,
    slots: &[Slot],
    buffer: &mut CudaSlice<f32>,
    exec: &mut GpuExecutor,
) -> Result<(), NnError> {
    for slot in slots.iter().filter(|s| s.len > 0) {
        let Some(grad) = exec.param_grad_mut(slot.param) else { continue };
        let mut part = buffer.slice_mut(slot.offset..slot.offset + slot.len);
        gpu.stream_ref().memcpy_dtod(&grad.slice(0..slot.len), &mut part).map_err(|e| gpu.driver(e))?;
    }
    Ok(())
}

/// Writes `0 + scale · sum` from `buffer` (a bucket's sums) into the gradients of the
/// bucket's parameters, on `stream`.
///
/// # Errors
/// [`NnError::Device`].
fn write_back(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    slots: &[Slot],
    buffer: &CudaSlice<f32>,
    exec: &mut GpuExecutor,
    scale: f32,
) -> Result<(), NnError> {
    for slot in slots.iter().filter(|s| s.len > 0) {
        let Some(grad) = exec.param_grad_mut(slot.param) else { continue };
        let n = len_u32(slot.len, "GpuTrainer::replica")?;
        let part = buffer.slice(slot.offset..slot.offset + slot.len);
        let mut grad = grad.slice_mut(0..slot.len);
        launch!(gpu, "fill_f32", on = stream, n; &mut grad, &0.0f32, &n)?;
        launch!(gpu, "axpy_f32", on = stream, n; &scale, &part, &mut grad, &n)?;
    }
    Ok(())
}
