//! Collectives over device buffers, for data-parallel training on GPUs (feature `cuda`): the
//! [`GpuCommunicator`] trait, which [`NcclGroup`](super::NcclGroup) implements on the device,
//! and [`HostStagedGroup`], which gives any host [`Communicator`] (a
//! [`TcpGroup`](super::TcpGroup)) the same device all-reduce by staging the buffer through
//! host memory: for replicas without NCCL, or several replicas sharing one GPU.
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};

use super::collective::{CollectiveError, Communicator};
use super::cuda::{DeviceError, Gpu};

/// A device failure during collective `op`, as the collective's error.
pub(super) fn device_error(op: &'static str, error: DeviceError) -> CollectiveError {
    CollectiveError::Backend { op, message: error.to_string() }
}

/// A [`Communicator`] whose rank holds one GPU, and which can also sum buffers on that GPU
/// over all ranks.
pub trait GpuCommunicator: Communicator {
    /// The GPU whose buffers this rank reduces.
    fn gpu(&self) -> &Arc<Gpu>;

    /// Sums `data`, a buffer on [`GpuCommunicator::gpu`], over all ranks, in place, after
    /// the work already queued on that GPU's stream and before any queued later.
    ///
    /// # Errors
    /// [`CollectiveError`] naming the rank or backend that failed.
    fn all_reduce_device(&mut self, data: &mut CudaSlice<f32>) -> Result<(), CollectiveError>;

    /// The stream of [`GpuCommunicator::gpu`] that the group queues its collectives on when
    /// the host does not wait for them (NCCL), so that a caller can reduce there while the
    /// GPU's main stream goes on with other work
    /// ([`GpuCommunicator::all_reduce_on_group_stream`]). `None` (the default): each
    /// collective makes the host wait.
    fn group_stream(&self) -> Option<&Arc<CudaStream>> {
        None
    }

    /// Sums `data`, a buffer on [`GpuCommunicator::gpu`], over all ranks, in place, queued on
    /// [`GpuCommunicator::group_stream`] after the work queued there before, and not ordered
    /// with the GPU's main stream: the caller makes the group stream wait for an event
    /// recorded on the main stream after its writes to `data`, and the main stream wait for
    /// one recorded on the group stream after the sum before it uses `data` again. A group
    /// without a group stream sums as [`GpuCommunicator::all_reduce_device`] does.
    ///
    /// # Errors
    /// [`CollectiveError`] naming the rank or backend that failed.
    fn all_reduce_on_group_stream(&mut self, data: &mut CudaSlice<f32>) -> Result<(), CollectiveError> {
        self.all_reduce_device(data)
    }

    /// Why the group failed in the background, if it did (an NCCL group whose watchdog
    /// aborted it). A host that waited for the GPU checks this before using what the GPU
    /// computed after a collective: the abort ended the wait, not the collective.
    fn failure(&self) -> Option<CollectiveError> {
        None
    }
}

/// A host [`Communicator`] used for buffers on one GPU: each device all-reduce waits for
/// the GPU, copies the buffer to the host, all-reduces it there, and copies it back.
///
/// Slower than NCCL (two copies, and the host waits), but it needs only the host group:
/// replicas on machines without NCCL, or on one GPU (NCCL refuses two ranks of a group on
/// the same device), can still train together.
pub struct HostStagedGroup {
    gpu: Arc<Gpu>,
    comm: Box<dyn Communicator>,
}

impl std::fmt::Debug for HostStagedGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostStagedGroup")
            .field("gpu", &self.gpu.ordinal())
            .field("rank", &self.comm.rank())
            .field("size", &self.comm.size())
            .finish()
    }
}

impl HostStagedGroup {
    /// `comm`'s rank, reducing buffers of `gpu`.
    pub fn new(gpu: Arc<Gpu>, comm: Box<dyn Communicator>) -> Self {
        HostStagedGroup { gpu, comm }
    }
}

impl GpuCommunicator for HostStagedGroup {
    fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    fn all_reduce_device(&mut self, data: &mut CudaSlice<f32>) -> Result<(), CollectiveError> {
        // The download waits for the work queued before it.
        let mut host = self.gpu.download(data).map_err(|e| device_error("all_reduce", e))?;
        self.comm.all_reduce(&mut host)?;
        self.gpu
            .stream_ref()
            .memcpy_htod(host.as_slice(), data)
            .map_err(|e| device_error("all_reduce", self.gpu.driver(e)))
    }
}

impl Communicator for HostStagedGroup {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn size(&self) -> usize {
        self.comm.size()
    }

    fn all_reduce(&mut self, data: &mut [f32]) -> Result<(), CollectiveError> {
        self.comm.all_reduce(data)
    }

    fn broadcast(&mut self, data: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        self.comm.broadcast(data, root)
    }

    fn all_gather(&mut self, local: &[f32], out: &mut [f32]) -> Result<(), CollectiveError> {
        self.comm.all_gather(local, out)
    }

    fn reduce_scatter(&mut self, data: &mut [f32], out: &mut [f32]) -> Result<(), CollectiveError> {
        self.comm.reduce_scatter(data, out)
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        self.comm.barrier()
    }
}
