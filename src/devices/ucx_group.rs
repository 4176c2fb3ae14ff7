//! `UcxGroup` (feature `ucx`): the collectives of [`Communicator`] over UCX (the system's
//! `libucp`, bound at build time): tagged messages between UCP workers, over whatever
//! transports UCX finds (shared memory and cross-memory attach between processes of one
//! machine, TCP, or RDMA where there is a NIC). Everything unsafe about UCP stays here.
//!
//! # Forming the group
//! The members first join a [`TcpGroup`] at the rendezvous (authenticated with the cluster
//! secret, as every group is), gather each other's UCP worker addresses through it, and
//! then connect a UCP endpoint to every other member; the TCP group is then closed.
//!
//! # Ordering and determinism
//! A small all-reduce exchanges whole buffers and sums them in rank order on every rank; a
//! large one is a ring (reduce-scatter, then all-gather): each segment is summed along the
//! ring once, in one fixed order, and then copied. Either way every rank holds the same bits.
//! Every message's tag carries the collective's sequence number, its step and its sender,
//! so messages of different steps or collectives never match each other.
//!
//! # Failure
//! Endpoints use UCX's peer error handling: a member whose process dies fails the
//! operations that wait on it with [`CollectiveError::PeerLost`]; one that stays silent for
//! the group's timeout fails them with [`CollectiveError::Timeout`] naming it. In a ring
//! (large all-reduces, all-gather, reduce-scatter) a rank waits only on its left neighbour,
//! so when a member fails, ranks further along the ring may name the neighbour that stopped
//! sending because of it rather than the member itself.
use std::ffi::{c_void, CStr};
use std::ptr::{null, null_mut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::collective::{
    check_gather, check_root, check_scatter, segment, CollectiveError, Communicator, GroupConfig, TcpGroup,
};

#[allow(
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    dead_code,
    unreachable_pub,
    unused_imports,
    clippy::all
)]
mod ffi {
    include!(concat!(env!("OUT_DIR"), "/ucx.rs"));
}

type Result<T, E = CollectiveError> = std::result::Result<T, E>;

/// All-reduces up to this size exchange whole buffers between every pair of ranks in one
/// step (latency-bound: one step instead of the ring's `2 (size - 1)`); larger ones use the
/// ring (bandwidth-bound).
const DIRECT_ALL_REDUCE_BYTES: usize = 64 << 10;

/// UCX's words for a status code.
fn status_text(status: ffi::ucs_status_t) -> String {
    // SAFETY: ucs_status_string returns a static string for every code.
    let text = unsafe { ffi::ucs_status_string(status) };
    if text.is_null() {
        return format!("UCX status {status}");
    }
    // SAFETY: a NUL-terminated static string (checked non-null).
    unsafe { CStr::from_ptr(text) }.to_string_lossy().into_owned()
}

fn setup_error(call: &str, status: ffi::ucs_status_t) -> CollectiveError {
    CollectiveError::Setup(format!("{call}: {}", status_text(status)))
}

/// What a non-blocking UCP call returned: done at once, an error, or a request to wait on.
enum Started {
    Done,
    Failed(ffi::ucs_status_t),
    Pending(*mut c_void),
}

fn started(ptr: ffi::ucs_status_ptr_t) -> Started {
    // UCS_PTR_IS_ERR: error codes are small negative numbers cast to pointers.
    let code = ptr as isize;
    if ptr.is_null() {
        Started::Done
    } else if (ptr as usize) >= (ffi::ucs_status_t_UCS_ERR_LAST as isize as usize) {
        Started::Failed(code as ffi::ucs_status_t)
    } else {
        Started::Pending(ptr)
    }
}

/// One message of an exchange in flight.
struct InFlight {
    peer: usize,
    request: *mut c_void,
    /// For a receive: the bytes expected.
    expect: Option<usize>,
}

/// The tag of a message: the collective's sequence number, the step and the sender.
fn tag(sequence: u32, step: usize, sender: usize) -> u64 {
    (u64::from(sequence) << 32) | ((step as u64 & 0xffff) << 16) | (sender as u64 & 0xffff)
}

/// Called by UCX when an endpoint to a peer fails: marks the peer as lost.
unsafe extern "C" fn peer_failed(arg: *mut c_void, _ep: ffi::ucp_ep_h, _status: ffi::ucs_status_t) {
    // SAFETY: `arg` is the address of this peer's flag, which the group keeps (boxed, so it
    // does not move) until its endpoints are closed.
    let flag = unsafe { &*(arg as *const AtomicBool) };
    flag.store(true, Ordering::SeqCst);
}

/// A collective group over UCX tagged messages between every pair of ranks.
pub struct UcxGroup {
    rank: usize,
    size: usize,
    timeout: Duration,
    context: ffi::ucp_context_h,
    worker: ffi::ucp_worker_h,
    /// Endpoints by rank (null at this rank's own index).
    endpoints: Vec<ffi::ucp_ep_h>,
    /// Per rank: whether UCX reported its endpoint failed.
    lost: Box<[AtomicBool]>,
    /// Collectives started so far (the high half of every tag).
    sequence: u32,
    /// The receive buffer of the ring, kept between operations.
    scratch: Vec<f32>,
}

// SAFETY: the worker is created for one thread at a time (UCS_THREAD_MODE_SINGLE) and the
// group is used through `&mut self` only; moving it to another thread between calls is
// allowed by UCX.
unsafe impl Send for UcxGroup {}

impl std::fmt::Debug for UcxGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UcxGroup").field("rank", &self.rank).field("size", &self.size).finish()
    }
}

impl UcxGroup {
    /// Joins a group: meets the others at the rendezvous (as a [`TcpGroup`] does), exchanges
    /// UCP worker addresses with them, and connects a UCP endpoint to each.
    ///
    /// # Errors
    /// [`CollectiveError::Setup`] if the rendezvous fails or UCX cannot start or connect.
    pub fn join(config: GroupConfig) -> Result<UcxGroup> {
        let (rank, size, timeout) = (config.rank, config.size, config.timeout);
        let mut bootstrap = TcpGroup::join(config)?;
        let mut group = UcxGroup::start(rank, size, timeout)?;
        let address = group.worker_address()?;
        let addresses = exchange_bytes(&mut bootstrap, &address)?;
        group.connect(&addresses)?;
        // Every endpoint exists before the first collective's messages.
        bootstrap.barrier()?;
        Ok(group)
    }

    /// A UCP context and worker, not yet connected.
    fn start(rank: usize, size: usize, timeout: Duration) -> Result<UcxGroup> {
        let mut config: *mut ffi::ucp_config_t = null_mut();
        // SAFETY: reads the UCX_* environment into a new config, released below.
        let status = unsafe { ffi::ucp_config_read(null(), null(), &mut config) };
        if status != ffi::ucs_status_t_UCS_OK {
            return Err(setup_error("ucp_config_read", status));
        }
        // UCX's TCP transport (1.13, Debian's) aborts the process on an assertion
        // (`tcp_iface.c:307`) when one epoll batch holds an event for a connection that an
        // earlier event of the batch closed, which happens when a peer dies: about 2 % of
        // the dead-member test's runs (12 of 660) killed a surviving member. One event per
        // wait leaves no stale event behind: 0 of 1,300 runs (500 with this code), and no
        // measurable change in bandwidth. The key is the TCP transport's `MAX_POLL` (as
        // `UCX_TCP_MAX_POLL`, which a user may still set; `ucp_config_modify` takes it
        // without the transport's prefix).
        if std::env::var_os("UCX_TCP_MAX_POLL").is_none() {
            // SAFETY: a live config and NUL-terminated strings.
            let status = unsafe { ffi::ucp_config_modify(config, c"MAX_POLL".as_ptr(), c"1".as_ptr()) };
            if status != ffi::ucs_status_t_UCS_OK {
                // SAFETY: the config was read above and is not used after this.
                unsafe { ffi::ucp_config_release(config) };
                return Err(setup_error("ucp_config_modify(MAX_POLL)", status));
            }
        }
        // SAFETY: an all-zero params struct is "no fields set"; the set fields follow.
        let mut params: ffi::ucp_params_t = unsafe { std::mem::zeroed() };
        params.field_mask = ffi::ucp_params_field_UCP_PARAM_FIELD_FEATURES as u64;
        params.features = ffi::ucp_feature_UCP_FEATURE_TAG as u64;
        let mut context: ffi::ucp_context_h = null_mut();
        // SAFETY: valid params and config; `ucp_init` is a static inline over this call.
        let status = unsafe {
            ffi::ucp_init_version(ffi::UCP_API_MAJOR, ffi::UCP_API_MINOR, &params, config, &mut context)
        };
        // SAFETY: the config was read above and is not used after this.
        unsafe { ffi::ucp_config_release(config) };
        if status != ffi::ucs_status_t_UCS_OK {
            return Err(setup_error("ucp_init", status));
        }
        // SAFETY: as for `params`.
        let mut worker_params: ffi::ucp_worker_params_t = unsafe { std::mem::zeroed() };
        worker_params.field_mask = ffi::ucp_worker_params_field_UCP_WORKER_PARAM_FIELD_THREAD_MODE as u64;
        worker_params.thread_mode = ffi::ucs_thread_mode_t_UCS_THREAD_MODE_SINGLE;
        let mut worker: ffi::ucp_worker_h = null_mut();
        // SAFETY: a live context and valid params.
        let status = unsafe { ffi::ucp_worker_create(context, &worker_params, &mut worker) };
        if status != ffi::ucs_status_t_UCS_OK {
            // SAFETY: the context has no worker; it is not used after this.
            unsafe { ffi::ucp_cleanup(context) };
            return Err(setup_error("ucp_worker_create", status));
        }
        Ok(UcxGroup {
            rank,
            size,
            timeout,
            context,
            worker,
            endpoints: vec![null_mut(); size],
            lost: (0..size).map(|_| AtomicBool::new(false)).collect(),
            sequence: 0,
            scratch: Vec::new(),
        })
    }

    /// This worker's address, as bytes another worker connects to.
    fn worker_address(&self) -> Result<Vec<u8>> {
        let mut address: *mut ffi::ucp_address_t = null_mut();
        let mut length = 0usize;
        // SAFETY: a live worker; the address is copied and released below.
        let status = unsafe { ffi::ucp_worker_get_address(self.worker, &mut address, &mut length) };
        if status != ffi::ucs_status_t_UCS_OK {
            return Err(setup_error("ucp_worker_get_address", status));
        }
        // SAFETY: UCX returned `length` bytes at `address`.
        let bytes = unsafe { std::slice::from_raw_parts(address as *const u8, length) }.to_vec();
        // SAFETY: releases the address obtained above, once.
        unsafe { ffi::ucp_worker_release_address(self.worker, address) };
        Ok(bytes)
    }

    /// Connects an endpoint to every other rank's worker address.
    fn connect(&mut self, addresses: &[Vec<u8>]) -> Result<()> {
        for (peer, address) in addresses.iter().enumerate() {
            if peer == self.rank {
                continue;
            }
            // SAFETY: as for `params` in `start`.
            let mut params: ffi::ucp_ep_params_t = unsafe { std::mem::zeroed() };
            params.field_mask = (ffi::ucp_ep_params_field_UCP_EP_PARAM_FIELD_REMOTE_ADDRESS
                | ffi::ucp_ep_params_field_UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE
                | ffi::ucp_ep_params_field_UCP_EP_PARAM_FIELD_ERR_HANDLER)
                as u64;
            params.address = address.as_ptr() as *const ffi::ucp_address_t;
            params.err_mode = ffi::ucp_err_handling_mode_t_UCP_ERR_HANDLING_MODE_PEER;
            params.err_handler.cb = Some(peer_failed);
            params.err_handler.arg = &self.lost[peer] as *const AtomicBool as *mut c_void;
            let mut endpoint: ffi::ucp_ep_h = null_mut();
            // SAFETY: a live worker; the address bytes outlive the call (UCX copies them).
            let status = unsafe { ffi::ucp_ep_create(self.worker, &params, &mut endpoint) };
            if status != ffi::ucs_status_t_UCS_OK {
                return Err(CollectiveError::Setup(format!(
                    "connecting to rank {peer}: {}",
                    status_text(status)
                )));
            }
            self.endpoints[peer] = endpoint;
        }
        Ok(())
    }

    /// Sends each `sends[i].1` to rank `sends[i].0` and fills each `recvs[j].1` from rank
    /// `recvs[j].0`, all at once, as step `step` of the current collective.
    fn transfer(
        &mut self,
        op: &'static str,
        step: usize,
        sends: &[(usize, &[u8])],
        recvs: &mut [(usize, &mut [u8])],
    ) -> Result<()> {
        let mut in_flight: Vec<InFlight> = Vec::with_capacity(sends.len() + recvs.len());
        let result = self.post_and_wait(op, step, sends, recvs, &mut in_flight);
        if !in_flight.is_empty() {
            self.abandon(&mut in_flight);
        }
        result
    }

    fn post_and_wait(
        &mut self,
        op: &'static str,
        step: usize,
        sends: &[(usize, &[u8])],
        recvs: &mut [(usize, &mut [u8])],
        in_flight: &mut Vec<InFlight>,
    ) -> Result<()> {
        let sequence = self.sequence;
        for (peer, buffer) in recvs.iter_mut() {
            // SAFETY: as for `params` in `start`.
            let mut param: ffi::ucp_request_param_t = unsafe { std::mem::zeroed() };
            // Always a request, so that its length can be checked.
            param.op_attr_mask = ffi::ucp_op_attr_t_UCP_OP_ATTR_FLAG_NO_IMM_CMPL;
            // SAFETY: a live worker; `buffer` outlives the request (the request completes or
            // is cancelled and completed before `transfer` returns).
            let request = unsafe {
                ffi::ucp_tag_recv_nbx(
                    self.worker,
                    buffer.as_mut_ptr() as *mut c_void,
                    buffer.len(),
                    tag(sequence, step, *peer),
                    u64::MAX,
                    &param,
                )
            };
            match started(request) {
                Started::Pending(request) => {
                    in_flight.push(InFlight { peer: *peer, request, expect: Some(buffer.len()) })
                }
                Started::Done => {}
                Started::Failed(status) => return Err(self.failed(*peer, op, status)),
            }
        }
        for &(peer, bytes) in sends {
            // SAFETY: as for `params` in `start`.
            let param: ffi::ucp_request_param_t = unsafe { std::mem::zeroed() };
            // SAFETY: a connected endpoint; `bytes` outlives the request (as above).
            let request = unsafe {
                ffi::ucp_tag_send_nbx(
                    self.endpoints[peer],
                    bytes.as_ptr() as *const c_void,
                    bytes.len(),
                    tag(sequence, step, self.rank),
                    &param,
                )
            };
            match started(request) {
                Started::Pending(request) => in_flight.push(InFlight { peer, request, expect: None }),
                Started::Done => {}
                Started::Failed(status) => return Err(self.failed(peer, op, status)),
            }
        }
        let deadline = Instant::now() + self.timeout;
        while !in_flight.is_empty() {
            // SAFETY: a live worker, driven from this thread only.
            let progressed = unsafe { ffi::ucp_worker_progress(self.worker) };
            let mut i = 0;
            while i < in_flight.len() {
                let InFlight { peer, request, expect } = in_flight[i];
                let (status, length) = match expect {
                    Some(_) => {
                        // SAFETY: as for `params` in `start`.
                        let mut info: ffi::ucp_tag_recv_info_t = unsafe { std::mem::zeroed() };
                        // SAFETY: a live receive request.
                        (unsafe { ffi::ucp_tag_recv_request_test(request, &mut info) }, info.length)
                    }
                    // SAFETY: a live send request.
                    None => (unsafe { ffi::ucp_request_check_status(request) }, 0),
                };
                if status == ffi::ucs_status_t_UCS_INPROGRESS {
                    i += 1;
                    continue;
                }
                // SAFETY: the request completed; it is freed once and forgotten.
                unsafe { ffi::ucp_request_free(request) };
                in_flight.swap_remove(i);
                if status != ffi::ucs_status_t_UCS_OK {
                    return Err(self.failed(peer, op, status));
                }
                if let Some(expected) = expect {
                    if length != expected {
                        return Err(CollectiveError::PeerLost {
                            rank: peer,
                            op,
                            message: format!("sent {length} bytes where {expected} were expected"),
                        });
                    }
                }
            }
            if let Some(peer) =
                in_flight.iter().map(|f| f.peer).find(|&p| self.lost[p].load(Ordering::SeqCst))
            {
                return Err(CollectiveError::PeerLost {
                    rank: peer,
                    op,
                    message: "its endpoint failed".into(),
                });
            }
            if progressed == 0 {
                if Instant::now() > deadline {
                    // Blame a peer whose message did not come, else one that did not take ours.
                    let blame = in_flight.iter().find(|f| f.expect.is_some()).unwrap_or(&in_flight[0]).peer;
                    return Err(CollectiveError::Timeout { rank: blame, op, timeout: self.timeout });
                }
                std::thread::yield_now();
            }
        }
        Ok(())
    }

    fn failed(&self, peer: usize, op: &'static str, status: ffi::ucs_status_t) -> CollectiveError {
        CollectiveError::PeerLost { rank: peer, op, message: status_text(status) }
    }

    /// Cancels the requests still in flight and waits (briefly) for them to complete, so
    /// that no request writes into a buffer after `transfer` returns.
    fn abandon(&mut self, in_flight: &mut Vec<InFlight>) {
        for f in in_flight.iter() {
            // SAFETY: a live request of this worker.
            unsafe { ffi::ucp_request_cancel(self.worker, f.request) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !in_flight.is_empty() && Instant::now() < deadline {
            // SAFETY: as in `post_and_wait`.
            unsafe { ffi::ucp_worker_progress(self.worker) };
            in_flight.retain(|f| {
                // SAFETY: a live request.
                let status = unsafe { ffi::ucp_request_check_status(f.request) };
                if status == ffi::ucs_status_t_UCS_INPROGRESS {
                    return true;
                }
                // SAFETY: completed (or cancelled): freed once.
                unsafe { ffi::ucp_request_free(f.request) };
                false
            });
        }
        // (A request that outlives the deadline is leaked rather than freed while in use.)
        in_flight.clear();
    }

    /// The ring's reduce-scatter: afterwards segment `rank` of `data` holds the sum over
    /// ranks. At step `s` a rank sends segment `rank - s - 1` to its right neighbour and adds
    /// the segment `rank - s - 2` it receives from its left one (indices mod `size`).
    fn ring_reduce_scatter(&mut self, op: &'static str, data: &mut [f32]) -> Result<()> {
        let (rank, n) = (self.rank, self.size);
        let (right, left) = ((rank + 1) % n, (rank + n - 1) % n);
        let mut scratch = std::mem::take(&mut self.scratch);
        let result = (|| {
            for s in 0..n - 1 {
                let send_seg = segment(data.len(), n, (rank + 2 * n - s - 1) % n);
                let recv_seg = segment(data.len(), n, (rank + 2 * n - s - 2) % n);
                scratch.resize(recv_seg.len(), 0.0);
                let sends = [(right, bytemuck::cast_slice::<f32, u8>(&data[send_seg]))];
                let mut recvs = [(left, bytemuck::cast_slice_mut::<f32, u8>(&mut scratch[..]))];
                self.transfer(op, s, &sends, &mut recvs)?;
                data[recv_seg].iter_mut().zip(&scratch).for_each(|(mine, theirs)| *mine += *theirs);
            }
            Ok(())
        })();
        self.scratch = scratch;
        result
    }

    /// The ring's all-gather of segments (`segment(len, size, r)` of rank `r`, already in
    /// place): at step `s` a rank sends segment `rank - s` right and receives segment
    /// `rank - s - 1` from the left. `first_step` numbers the steps after earlier ones of the
    /// same collective.
    fn ring_all_gather(&mut self, op: &'static str, data: &mut [f32], first_step: usize) -> Result<()> {
        let (rank, n) = (self.rank, self.size);
        let (right, left) = ((rank + 1) % n, (rank + n - 1) % n);
        for s in 0..n - 1 {
            let send_seg = segment(data.len(), n, (rank + n - s) % n);
            let recv_seg = segment(data.len(), n, (rank + 2 * n - s - 1) % n);
            // The two segments never overlap (different indices), so split the buffer.
            let (send, recv): (&[f32], &mut [f32]) = if send_seg.start < recv_seg.start {
                let (a, b) = data.split_at_mut(recv_seg.start);
                (&a[send_seg], &mut b[..recv_seg.len()])
            } else {
                let (a, b) = data.split_at_mut(send_seg.start);
                (&b[..send_seg.len()], &mut a[recv_seg])
            };
            let sends = [(right, bytemuck::cast_slice::<f32, u8>(send))];
            let mut recvs = [(left, bytemuck::cast_slice_mut::<f32, u8>(recv))];
            self.transfer(op, first_step + s, &sends, &mut recvs)?;
        }
        Ok(())
    }

    /// All-reduce of a small `data`: every rank sends its data to every other and sums all
    /// of them in rank order (the same additions in the same order everywhere, so the same
    /// bits), in one step; a failed or silent member is then the one named.
    fn all_reduce_direct(&mut self, data: &mut [f32]) -> Result<()> {
        let (rank, size) = (self.rank, self.size);
        let mut received = vec![vec![0f32; data.len()]; size];
        {
            let mine: &[u8] = bytemuck::cast_slice(data);
            let sends: Vec<(usize, &[u8])> = (0..size).filter(|&r| r != rank).map(|r| (r, mine)).collect();
            let mut recvs: Vec<(usize, &mut [u8])> = received
                .iter_mut()
                .enumerate()
                .filter(|(r, _)| *r != rank)
                .map(|(r, slot)| (r, bytemuck::cast_slice_mut::<f32, u8>(slot)))
                .collect();
            self.transfer("all_reduce", 0, &sends, &mut recvs)?;
        }
        received[rank].copy_from_slice(data);
        data.copy_from_slice(&received[0]);
        for other in &received[1..] {
            data.iter_mut().zip(other).for_each(|(sum, x)| *sum += *x);
        }
        Ok(())
    }

    fn next_collective(&mut self) {
        self.sequence = self.sequence.wrapping_add(1);
    }
}

impl Drop for UcxGroup {
    fn drop(&mut self) {
        for endpoint in self.endpoints.iter_mut().filter(|e| !e.is_null()) {
            // SAFETY: as for `params` in `start`.
            let mut param: ffi::ucp_request_param_t = unsafe { std::mem::zeroed() };
            param.op_attr_mask = ffi::ucp_op_attr_t_UCP_OP_ATTR_FIELD_FLAGS;
            param.flags = ffi::ucp_ep_close_flags_t_UCP_EP_CLOSE_FLAG_FORCE;
            // SAFETY: a live endpoint, closed once.
            let request = unsafe { ffi::ucp_ep_close_nbx(*endpoint, &param) };
            if let Started::Pending(request) = started(request) {
                let deadline = Instant::now() + Duration::from_secs(5);
                loop {
                    // SAFETY: a live worker and request.
                    unsafe { ffi::ucp_worker_progress(self.worker) };
                    let status = unsafe { ffi::ucp_request_check_status(request) };
                    if status != ffi::ucs_status_t_UCS_INPROGRESS || Instant::now() > deadline {
                        // SAFETY: freed once (UCX frees an incomplete request when done).
                        unsafe { ffi::ucp_request_free(request) };
                        break;
                    }
                }
            }
            *endpoint = null_mut();
        }
        // SAFETY: no endpoint or request is left; the worker, then the context, go once.
        unsafe {
            ffi::ucp_worker_destroy(self.worker);
            ffi::ucp_cleanup(self.context);
        }
    }
}

/// Gathers every rank's bytes (of any length) through `group`: their lengths first, then
/// the bytes padded to the longest, packed four to an `f32` (the collective only copies
/// them, so every bit pattern survives).
fn exchange_bytes(group: &mut TcpGroup, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
    let size = group.size();
    let mut lengths = vec![0f32; size];
    // Lengths (a few hundred bytes) are exact in an f32.
    group.all_gather(&[mine.len() as f32], &mut lengths)?;
    let longest = lengths.iter().fold(0usize, |m, &l| m.max(l as usize));
    let words = longest.div_ceil(4);
    let mut padded = vec![0u8; words * 4];
    padded[..mine.len()].copy_from_slice(mine);
    let local: Vec<f32> =
        padded.chunks_exact(4).map(|w| f32::from_ne_bytes([w[0], w[1], w[2], w[3]])).collect();
    let mut all = vec![0f32; words * size];
    group.all_gather(&local, &mut all)?;
    let bytes: &[u8] = bytemuck::cast_slice(&all);
    Ok((0..size).map(|r| bytes[r * words * 4..r * words * 4 + lengths[r] as usize].to_vec()).collect())
}

impl Communicator for UcxGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce(&mut self, data: &mut [f32]) -> Result<()> {
        if self.size == 1 || data.is_empty() {
            return Ok(());
        }
        self.next_collective();
        if std::mem::size_of_val(data) <= DIRECT_ALL_REDUCE_BYTES {
            return self.all_reduce_direct(data);
        }
        self.ring_reduce_scatter("all_reduce", data)?;
        let steps = self.size - 1;
        self.ring_all_gather("all_reduce", data, steps)
    }

    fn broadcast(&mut self, data: &mut [f32], root: usize) -> Result<()> {
        check_root(root, self.size)?;
        if self.size == 1 {
            return Ok(());
        }
        self.next_collective();
        if self.rank == root {
            let bytes = bytemuck::cast_slice::<f32, u8>(data);
            let sends: Vec<(usize, &[u8])> =
                (0..self.size).filter(|&r| r != root).map(|r| (r, bytes)).collect();
            self.transfer("broadcast", 0, &sends, &mut [])
        } else {
            self.transfer("broadcast", 0, &[], &mut [(root, bytemuck::cast_slice_mut(data))])
        }
    }

    fn all_gather(&mut self, local: &[f32], out: &mut [f32]) -> Result<()> {
        check_gather(local.len(), out.len(), self.size)?;
        let n = local.len();
        out[self.rank * n..(self.rank + 1) * n].copy_from_slice(local);
        if self.size == 1 || n == 0 {
            return Ok(());
        }
        self.next_collective();
        // Equal parts: segment r of `out` is rank r's `local`.
        self.ring_all_gather("all_gather", out, 0)
    }

    fn reduce_scatter(&mut self, data: &mut [f32], out: &mut [f32]) -> Result<()> {
        let mine = segment(data.len(), self.size, self.rank);
        check_scatter(out.len(), mine.len())?;
        if self.size > 1 && !data.is_empty() {
            self.next_collective();
            self.ring_reduce_scatter("reduce_scatter", data)?;
        }
        out.copy_from_slice(&data[mine]);
        Ok(())
    }

    fn barrier(&mut self) -> Result<()> {
        if self.size == 1 {
            return Ok(());
        }
        self.next_collective();
        let token = [0u8; 1];
        let mut tokens = vec![[0u8; 1]; self.size];
        let sends: Vec<(usize, &[u8])> =
            (0..self.size).filter(|&r| r != self.rank).map(|r| (r, &token[..])).collect();
        let me = self.rank;
        let mut recvs: Vec<(usize, &mut [u8])> =
            tokens.iter_mut().enumerate().filter(|(r, _)| *r != me).map(|(r, t)| (r, &mut t[..])).collect();
        self.transfer("barrier", 0, &sends, &mut recvs)
    }
}
