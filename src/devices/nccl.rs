//! NCCL collectives on one GPU per rank (feature `cuda`): a [`Communicator`] whose members
//! agree on NCCL's unique id over another group (for example a [`TcpGroup`](crate::TcpGroup)
//! of the runtime), then reduce device buffers with NCCL.
//!
//! Every collective fails within the group's timeout when the other ranks cannot complete
//! it (a rank died, stalled or lost its network): a watchdog aborts NCCL's communicator
//! (`nccl/watched.rs`).
//!
//! Collectives run on a stream of the group's own (as NCCL's users commonly do), so that
//! a trainer can reduce gradients there while backward goes on on the GPU's main stream
//! ([`GpuCommunicator::all_reduce_on_group_stream`]). The other collectives are ordered as
//! work on the main stream: the group stream waits for an event recorded on the main
//! stream first, and the main stream for one recorded after the collective.
//!
//! One GPU cannot hold two ranks of a group: multi-rank logic is tested with the TCP group;
//! NCCL is tested with one rank per device.
use std::ffi::{c_char, c_int};
use std::sync::Arc;
use std::time::Duration;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream};
use cudarc::nccl::sys::{self, ncclResult_t};

use super::collective::{segment, CollectiveError, Communicator};
use super::cuda::Gpu;
use super::gpu_group::{device_error, GpuCommunicator};

mod watched;
use watched::WatchedComm;

/// A collective group over NCCL, one rank per GPU.
pub struct NcclGroup {
    gpu: Arc<Gpu>,
    /// The stream of `gpu` that every collective is queued on.
    stream: Arc<CudaStream>,
    /// Recorded on the main stream before, and on `stream` after, a collective ordered as
    /// main-stream work (a stream's wait takes the event as last recorded, so they are
    /// recorded again each time).
    main_mark: CudaEvent,
    group_mark: CudaEvent,
    comm: WatchedComm,
    rank: usize,
    size: usize,
}

impl std::fmt::Debug for NcclGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclGroup").field("rank", &self.rank).field("size", &self.size).finish()
    }
}

/// NCCL's name and words for a result code, as `ncclInvalidUsage (invalid usage)`.
fn nccl_error_words(code: c_int) -> String {
    use ncclResult_t::*;
    let known = [
        ncclSuccess,
        ncclUnhandledCudaError,
        ncclSystemError,
        ncclInternalError,
        ncclInvalidArgument,
        ncclInvalidUsage,
        ncclRemoteError,
        ncclInProgress,
    ];
    // Only codes this build knows become cudarc's enum: another value in it would be
    // undefined behaviour.
    let Some(&result) = known.iter().find(|&&r| r as c_int == code) else {
        return format!("NCCL result {code} (unknown to this build of Tessera)");
    };
    // SAFETY: NCCL returns a static NUL-terminated string for any result code.
    let words = unsafe { sys::ncclGetErrorString(result) };
    if words.is_null() {
        format!("{result:?}")
    } else {
        // SAFETY: non-null, NUL-terminated and static (see above).
        format!("{result:?} ({})", unsafe { std::ffi::CStr::from_ptr(words) }.to_string_lossy())
    }
}

/// NCCL's unique id: the opaque bytes rank 0 makes and every rank must pass to NCCL.
type UniqueId = [c_char; 128];

/// The id's 128 bytes as the bits of 32 floats, for an f32 broadcast.
fn to_carrier(id: &UniqueId) -> [f32; 32] {
    std::array::from_fn(|i| {
        let b = &id[i * 4..i * 4 + 4];
        f32::from_bits(u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8]))
    })
}

/// The inverse of [`to_carrier`].
fn from_carrier(carrier: &[f32; 32]) -> UniqueId {
    std::array::from_fn(|i| carrier[i / 4].to_bits().to_le_bytes()[i % 4] as c_char)
}

/// Gives every member of `bootstrap` rank 0's NCCL unique id: rank 0 calls `make` and
/// broadcasts the id, the others receive it. The 128 bytes travel as 32 floats carrying
/// their bits (the group moves f32 buffers bit for bit, NaN patterns included), behind one
/// float that says whether rank 0 made an id at all, so that its failure reaches the other
/// ranks at once instead of after the bootstrap group's timeout.
///
/// # Errors
/// `make`'s error (rank 0); [`CollectiveError::Backend`] on the other ranks when rank 0
/// could not make an id; the bootstrap group's errors.
fn exchange_unique_id(
    bootstrap: &mut dyn Communicator,
    make: impl FnOnce() -> Result<UniqueId, CollectiveError>,
) -> Result<UniqueId, CollectiveError> {
    const MADE: f32 = 1.0;
    let mut message = [0f32; 33];
    if bootstrap.rank() == 0 {
        let made = make();
        if let Ok(id) = &made {
            message[0] = MADE;
            message[1..].copy_from_slice(&to_carrier(id));
        }
        bootstrap.broadcast(&mut message, 0)?;
        return made;
    }
    bootstrap.broadcast(&mut message, 0)?;
    if message[0] != MADE {
        return Err(CollectiveError::Backend {
            op: "join",
            message: "rank 0 could not make NCCL's unique id (its own error says why)".into(),
        });
    }
    Ok(from_carrier(&std::array::from_fn(|i| message[i + 1])))
}

/// How long [`NcclGroup::join`]'s group waits for NCCL's setup, and for each collective
/// once the GPU reached it, before it aborts NCCL's communicator.
pub const NCCL_TIMEOUT: Duration = Duration::from_secs(120);

impl NcclGroup {
    /// Forms an NCCL group with the same ranks as `bootstrap`: rank 0 makes NCCL's unique
    /// id and sends it to the others through `bootstrap`; then every rank sets up NCCL's
    /// communicator. The group's timeout is [`NCCL_TIMEOUT`] (see
    /// [`NcclGroup::join_within`]).
    ///
    /// # Errors
    /// As [`NcclGroup::join_within`].
    pub fn join(gpu: Arc<Gpu>, bootstrap: &mut dyn Communicator) -> Result<NcclGroup, CollectiveError> {
        Self::join_within(gpu, bootstrap, NCCL_TIMEOUT)
    }

    /// As [`NcclGroup::join`], with `timeout` as the group's timeout: NCCL's setup must
    /// finish within it, and so must each collective, counted from when this GPU reached it
    /// (a host queuing work far ahead of the GPU does not count against it). Otherwise,
    /// or when NCCL reports that another rank's process or the network failed, a watchdog
    /// aborts NCCL's communicator: the collective fails with [`CollectiveError::Aborted`],
    /// and so does every later one. NCCL alone would wait forever for a rank that died.
    ///
    /// Needs NCCL 2.14 or later (non-blocking communicators).
    ///
    /// # Errors
    /// [`CollectiveError::Backend`] if NCCL is missing, older than 2.14, or fails;
    /// [`CollectiveError::Aborted`] if a rank does not join NCCL in time; the bootstrap
    /// group's errors.
    pub fn join_within(
        gpu: Arc<Gpu>,
        bootstrap: &mut dyn Communicator,
        timeout: Duration,
    ) -> Result<NcclGroup, CollectiveError> {
        // SAFETY: only tries to load the NCCL library.
        if !unsafe { sys::is_culib_present() } {
            return Err(CollectiveError::Backend {
                op: "join",
                message: "the NCCL library (libnccl) is not installed".into(),
            });
        }
        let (rank, size) = (bootstrap.rank(), bootstrap.size());
        let id = exchange_unique_id(bootstrap, || {
            let mut id = sys::ncclUniqueId { internal: [0; 128] };
            // SAFETY: NCCL writes the id into `id`.
            let made = unsafe { sys::ncclGetUniqueId(&mut id) } as c_int;
            if made == 0 {
                Ok(id.internal)
            } else {
                Err(CollectiveError::Backend {
                    op: "join",
                    message: format!("ncclGetUniqueId failed: {}", nccl_error_words(made)),
                })
            }
        })?;
        let device = |e| device_error("join", e);
        let stream = gpu.new_stream().map_err(device)?;
        let mark = || {
            gpu.stream_ref()
                .record_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING))
                .map_err(|e| device(gpu.driver(e)))
        };
        let (main_mark, group_mark) = (mark()?, mark()?);
        let comm = WatchedComm::join(gpu.clone(), stream.clone(), rank, size, id, timeout)?;
        Ok(NcclGroup { gpu, stream, main_mark, group_mark, comm, rank, size })
    }

    /// Runs `collective` (queued on the group's stream) in the main stream's order: after
    /// the work queued on the main stream so far, and before any queued there later. The
    /// host does not wait.
    fn in_main_order(
        &mut self,
        op: &'static str,
        collective: impl FnOnce(&mut WatchedComm) -> Result<(), CollectiveError>,
    ) -> Result<(), CollectiveError> {
        let gpu = &*self.gpu;
        let driver = |e| device_error(op, gpu.driver(e));
        let main = gpu.stream_ref();
        self.main_mark.record(main).map_err(driver)?;
        self.stream.wait(&self.main_mark).map_err(driver)?;
        let queued = collective(&mut self.comm);
        // Even after a failure: the main stream may free the buffers next.
        self.group_mark.record(&self.stream).map_err(driver)?;
        main.wait(&self.group_mark).map_err(driver)?;
        queued
    }

    /// Why the group was aborted, if it was (see [`NcclGroup::join_within`]). A host that
    /// waited for the GPU checks this before using what the GPU computed: an abort ends
    /// the wait for the collectives in flight, whose buffers then hold partial sums.
    pub fn failure(&self) -> Option<CollectiveError> {
        self.comm.failure()
    }

    /// Sums a device buffer over all ranks, in place (gradients stay on the GPU), ordered as
    /// work on the GPU's main stream: after the work queued there before, and before any
    /// queued later. The host does not wait.
    ///
    /// # Errors
    /// [`CollectiveError::Backend`]; [`CollectiveError::Aborted`].
    pub fn all_reduce_device(&mut self, data: &mut CudaSlice<f32>) -> Result<(), CollectiveError> {
        self.in_main_order("all_reduce", |comm| comm.all_reduce_in_place(data))
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
        // The download waited for the GPU: an abort meanwhile left partial sums in `buffer`.
        if let Some(failure) = self.failure() {
            return Err(failure);
        }
        out.copy_from_slice(&host[..out.len()]);
        Ok(())
    }
}

impl GpuCommunicator for NcclGroup {
    fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    fn all_reduce_device(&mut self, data: &mut CudaSlice<f32>) -> Result<(), CollectiveError> {
        NcclGroup::all_reduce_device(self, data)
    }

    fn group_stream(&self) -> Option<&Arc<CudaStream>> {
        Some(&self.stream)
    }

    fn all_reduce_on_group_stream(&mut self, data: &mut CudaSlice<f32>) -> Result<(), CollectiveError> {
        self.comm.all_reduce_in_place(data)
    }

    fn failure(&self) -> Option<CollectiveError> {
        NcclGroup::failure(self)
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
        self.in_main_order("broadcast", |comm| comm.broadcast_in_place(&mut buffer, root))?;
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
        self.in_main_order("all_gather", |comm| comm.all_gather(&send, &mut receive))?;
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

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::time::Duration;

    use super::*;
    use crate::devices::collective::{GroupConfig, Rendezvous, TcpGroup};

    /// Runs `member` on each rank of a `size`-member TCP group (one thread each) and
    /// returns what each returned, in rank order.
    fn on_tcp_ranks<T: Send + 'static>(
        size: usize,
        member: impl Fn(&mut TcpGroup) -> T + Send + Copy + 'static,
    ) -> Vec<T> {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let meet =
            std::thread::spawn(move || Rendezvous::serve(listener, size, "s", Duration::from_secs(10)));
        let members: Vec<_> = (0..size)
            .map(|rank| {
                std::thread::spawn(move || {
                    let mut group = TcpGroup::join(GroupConfig::new(rank, size, addr, "s")).unwrap();
                    member(&mut group)
                })
            })
            .collect();
        let results = members.into_iter().map(|m| m.join().unwrap()).collect();
        meet.join().unwrap().unwrap();
        results
    }

    /// The id exchange of a multi-rank NCCL group, on the CPU backend (one GPU cannot hold
    /// two ranks): every rank of a 3-member TCP group ends with rank 0's exact bytes, every
    /// byte value included (so some carrier floats are NaNs, signalling ones among them);
    /// only rank 0 makes an id.
    #[test]
    fn every_rank_gets_rank_zeros_unique_id() {
        // Mixed bytes, with three NaN floats in front: a signalling NaN, a negative quiet
        // NaN and a signalling NaN with every payload bit set.
        let mut expected: UniqueId = std::array::from_fn(|i| ((i * 37 + 255) % 256) as u8 as c_char);
        for (slot, bits) in [0x7f80_0001u32, 0xffc0_0001, 0x7fbf_ffff].into_iter().enumerate() {
            for (b, v) in expected[slot * 4..slot * 4 + 4].iter_mut().zip(bits.to_le_bytes()) {
                *b = v as c_char;
            }
        }
        let results = on_tcp_ranks(3, move |group| {
            let mut calls = 0;
            let id = exchange_unique_id(group, || {
                calls += 1;
                Ok(expected)
            })
            .unwrap();
            (id, calls)
        });
        for (rank, (id, calls)) in results.into_iter().enumerate() {
            assert_eq!(id, expected, "rank {rank}");
            assert_eq!(calls, usize::from(rank == 0), "rank {rank} made an id");
        }
        let carrier = to_carrier(&expected);
        assert_eq!(carrier.iter().filter(|v| v.is_nan()).count(), 3, "the case carries NaN patterns");
    }

    /// When rank 0 cannot make an id, it returns its own error and every other rank learns
    /// that from rank 0 (not from a timeout of the bootstrap group).
    #[test]
    fn rank_zeros_failure_to_make_an_id_reaches_every_rank() {
        let results = on_tcp_ranks(3, |group| {
            exchange_unique_id(group, || {
                Err(CollectiveError::Backend { op: "join", message: "no id here".into() })
            })
        });
        for (rank, result) in results.into_iter().enumerate() {
            let expected = if rank == 0 { "no id here" } else { "rank 0 could not make" };
            match result {
                Err(CollectiveError::Backend { message, .. }) => {
                    assert!(message.contains(expected), "rank {rank}: {message}")
                }
                other => panic!("rank {rank}: expected rank 0's failure, got {other:?}"),
            }
        }
    }
}
