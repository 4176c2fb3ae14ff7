//! NCCL collectives on one GPU per rank (feature `cuda`): a [`Communicator`] whose members
//! agree on NCCL's unique id over another group (for example a [`TcpGroup`](crate::TcpGroup)
//! of the runtime), then reduce device buffers with NCCL.
//!
//! One GPU cannot hold two ranks of a group: multi-rank logic is tested with the TCP group;
//! NCCL is tested with one rank per device.
use std::sync::Arc;

use cudarc::driver::CudaSlice;
use cudarc::nccl::{Comm, Id, ReduceOp};

use super::collective::{segment, CollectiveError, Communicator};
use super::cuda::{DeviceError, Gpu};

/// A collective group over NCCL, one rank per GPU.
pub struct NcclGroup {
    gpu: Arc<Gpu>,
    comm: Comm,
    rank: usize,
    size: usize,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it do not
// overlap; `NcclGroup` is only used through `&mut self`.
unsafe impl Send for NcclGroup {}

impl std::fmt::Debug for NcclGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclGroup").field("rank", &self.rank).field("size", &self.size).finish()
    }
}

fn nccl_error(op: &'static str, error: cudarc::nccl::result::NcclError) -> CollectiveError {
    // `NcclError` implements `Debug` but not `Display`.
    CollectiveError::Backend { op, message: format!("{error:?}") }
}

fn device_error(op: &'static str, error: DeviceError) -> CollectiveError {
    CollectiveError::Backend { op, message: error.to_string() }
}

impl NcclGroup {
    /// Forms an NCCL group with the same ranks as `bootstrap`: rank 0 makes NCCL's unique
    /// id and sends it to the others through `bootstrap`.
    ///
    /// # Errors
    /// [`CollectiveError::Backend`] if NCCL is missing or fails; the bootstrap group's errors.
    pub fn join(gpu: Arc<Gpu>, bootstrap: &mut dyn Communicator) -> Result<NcclGroup, CollectiveError> {
        // SAFETY: only tries to load the NCCL library.
        if !unsafe { cudarc::nccl::sys::is_culib_present() } {
            return Err(CollectiveError::Backend {
                op: "join",
                message: "the NCCL library (libnccl) is not installed".into(),
            });
        }
        let (rank, size) = (bootstrap.rank(), bootstrap.size());
        // The 128-byte id travels as 32 floats carrying its bits.
        let mut carrier = [0f32; 32];
        let id = if rank == 0 {
            let id = Id::new().map_err(|e| nccl_error("join", e))?;
            for (slot, bytes) in carrier.iter_mut().zip(id.internal().chunks_exact(4)) {
                *slot = f32::from_bits(u32::from_le_bytes([
                    bytes[0] as u8,
                    bytes[1] as u8,
                    bytes[2] as u8,
                    bytes[3] as u8,
                ]));
            }
            bootstrap.broadcast(&mut carrier, 0)?;
            id
        } else {
            bootstrap.broadcast(&mut carrier, 0)?;
            let mut internal = [0 as std::ffi::c_char; 128];
            for (bytes, value) in internal.chunks_exact_mut(4).zip(carrier) {
                for (b, v) in bytes.iter_mut().zip(value.to_bits().to_le_bytes()) {
                    *b = v as std::ffi::c_char;
                }
            }
            Id::uninit(internal)
        };
        let comm = Comm::from_rank(gpu.stream(), rank, size, id).map_err(|e| nccl_error("join", e))?;
        Ok(NcclGroup { gpu, comm, rank, size })
    }

    /// Sums a device buffer over all ranks, in place (gradients stay on the GPU).
    ///
    /// # Errors
    /// [`CollectiveError::Backend`].
    pub fn all_reduce_device(&mut self, data: &mut CudaSlice<f32>) -> Result<(), CollectiveError> {
        self.comm.all_reduce_in_place(data, &ReduceOp::Sum).map_err(|e| nccl_error("all_reduce", e))?;
        Ok(())
    }

    fn upload(&self, op: &'static str, data: &[f32]) -> Result<CudaSlice<f32>, CollectiveError> {
        self.gpu.upload(data).map_err(|e| device_error(op, e))
    }

    fn download_into(
        &self,
        op: &'static str,
        buffer: &CudaSlice<f32>,
        out: &mut [f32],
    ) -> Result<(), CollectiveError> {
        let host = self.gpu.download(buffer).map_err(|e| device_error(op, e))?;
        out.copy_from_slice(&host[..out.len()]);
        Ok(())
    }
}

impl Communicator for NcclGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce(&mut self, data: &mut [f32]) -> Result<(), CollectiveError> {
        if data.is_empty() {
            return Ok(());
        }
        let mut buffer = self.upload("all_reduce", data)?;
        self.all_reduce_device(&mut buffer)?;
        self.download_into("all_reduce", &buffer, data)
    }

    fn broadcast(&mut self, data: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        if root >= self.size {
            return Err(CollectiveError::InvalidArgument {
                op: "broadcast",
                message: format!("root {root} of {}", self.size),
            });
        }
        if data.is_empty() {
            return Ok(());
        }
        let mut buffer = self.upload("broadcast", data)?;
        self.comm.broadcast_in_place(&mut buffer, root as i32).map_err(|e| nccl_error("broadcast", e))?;
        self.download_into("broadcast", &buffer, data)
    }

    fn all_gather(&mut self, local: &[f32], out: &mut [f32]) -> Result<(), CollectiveError> {
        if out.len() != local.len() * self.size {
            return Err(CollectiveError::InvalidArgument {
                op: "all_gather",
                message: format!("out has {} elements, expected {} × {}", out.len(), self.size, local.len()),
            });
        }
        if local.is_empty() {
            return Ok(());
        }
        let send = self.upload("all_gather", local)?;
        let mut receive = self.gpu.zeros(out.len()).map_err(|e| device_error("all_gather", e))?;
        self.comm.all_gather(&send, &mut receive).map_err(|e| nccl_error("all_gather", e))?;
        self.download_into("all_gather", &receive, out)
    }

    fn reduce_scatter(&mut self, data: &mut [f32], out: &mut [f32]) -> Result<(), CollectiveError> {
        let mine = segment(data.len(), self.size, self.rank);
        if out.len() != mine.len() {
            return Err(CollectiveError::InvalidArgument {
                op: "reduce_scatter",
                message: format!("out has {} elements, this rank's segment has {}", out.len(), mine.len()),
            });
        }
        // NCCL splits into equal parts; segments here may differ by one, so reduce the whole
        // buffer and keep this rank's segment.
        self.all_reduce(data)?;
        out.copy_from_slice(&data[mine]);
        Ok(())
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        let mut token = [0f32; 1];
        self.all_reduce(&mut token)
    }
}
