//! Collective communication among a fixed group of ranks: all-reduce, broadcast,
//! all-gather, reduce-scatter and barrier, behind one [`Communicator`] trait.
//!
//! The TCP backend ([`TcpGroup`]) connects every pair of ranks once (authenticated with the
//! cluster secret) and keeps one writer thread per peer, so sends and receives overlap.
//!
//! # Ordering and determinism
//! Every rank reduces in one fixed order, so all ranks hold bit-identical results: small
//! messages are exchanged whole and summed in rank order 0, 1, …; large ones use a ring
//! (reduce-scatter then all-gather), where each segment is summed along the ring once and
//! then copied.
//!
//! # Failure
//! A peer that closes its connection, or sends nothing for longer than the group's timeout,
//! fails the operation on every other rank with an error naming that rank — never a hang.
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::net::{decode_frame, MAX_FRAME_LEN};

/// Why a collective operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CollectiveError {
    /// A rank sent nothing for longer than the timeout.
    #[error("rank {rank} did not answer within {timeout:?} during {op}")]
    Timeout {
        /// The silent rank.
        rank: usize,
        /// The operation.
        op: &'static str,
        /// The group's timeout.
        timeout: Duration,
    },
    /// A rank's connection closed or failed.
    #[error("rank {rank} is gone during {op}: {message}")]
    PeerLost {
        /// The missing rank.
        rank: usize,
        /// The operation.
        op: &'static str,
        /// What the connection reported.
        message: String,
    },
    /// Buffers of the wrong length, or a rank out of range.
    #[error("invalid arguments to {op}: {message}")]
    InvalidArgument {
        /// The operation.
        op: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The group could not be formed.
    #[error("cannot form the group: {0}")]
    Setup(String),
    /// The backend (NCCL, the device) failed.
    #[error("{op} failed in the backend: {message}")]
    Backend {
        /// The operation.
        op: &'static str,
        /// What the backend reported.
        message: String,
    },
}

type Result<T, E = CollectiveError> = std::result::Result<T, E>;

/// Collective operations over `f32` buffers among `size()` ranks. Every rank must call the
/// same operations in the same order with buffers of the same length.
pub trait Communicator: Send {
    /// This member's rank, `0..size()`.
    fn rank(&self) -> usize;
    /// How many ranks the group has.
    fn size(&self) -> usize;
    /// Sums `data` over all ranks, in place.
    ///
    /// # Errors
    /// [`CollectiveError`] naming the rank that failed or stalled.
    fn all_reduce(&mut self, data: &mut [f32]) -> Result<()>;
    /// Copies `root`'s `data` to every rank.
    ///
    /// # Errors
    /// As [`Communicator::all_reduce`].
    fn broadcast(&mut self, data: &mut [f32], root: usize) -> Result<()>;
    /// Concatenates every rank's `local` (in rank order) into `out` (`size() * local.len()`).
    ///
    /// # Errors
    /// As [`Communicator::all_reduce`].
    fn all_gather(&mut self, local: &[f32], out: &mut [f32]) -> Result<()>;
    /// Sums `data` over all ranks and leaves this rank's segment (segment `rank` of `size()`
    /// nearly equal parts, see [`segment`]) in `out`.
    ///
    /// # Errors
    /// As [`Communicator::all_reduce`].
    fn reduce_scatter(&mut self, data: &mut [f32], out: &mut [f32]) -> Result<()>;
    /// Returns once every rank has called it.
    ///
    /// # Errors
    /// As [`Communicator::all_reduce`].
    fn barrier(&mut self) -> Result<()>;
}

/// The bounds of segment `index` when `len` elements are split among `parts` ranks.
pub fn segment(len: usize, parts: usize, index: usize) -> std::ops::Range<usize> {
    (len * index / parts)..(len * (index + 1) / parts)
}

/// Settings to join a group.
#[derive(Debug, Clone)]
pub struct GroupConfig {
    /// This member's rank.
    pub rank: usize,
    /// How many ranks.
    pub size: usize,
    /// The rendezvous address (where [`Rendezvous::serve`] listens).
    pub rendezvous: SocketAddr,
    /// The cluster secret.
    pub secret: String,
    /// A peer silent this long fails the operation (default 10 s).
    pub timeout: Duration,
}

impl GroupConfig {
    /// Rank `rank` of `size`, meeting at `rendezvous`.
    pub fn new(rank: usize, size: usize, rendezvous: SocketAddr, secret: impl Into<String>) -> Self {
        GroupConfig { rank, size, rendezvous, secret: secret.into(), timeout: Duration::from_secs(10) }
    }
}

/// Rendezvous messages (length-prefixed bincode, as everywhere on the wire).
#[derive(Debug, Serialize, Deserialize)]
enum Meet {
    Join { rank: u32, size: u32, listen: SocketAddr },
    Table { addrs: Vec<SocketAddr> },
    Hello { rank: u32 },
}

/// Introduces the members of a group to each other.
pub struct Rendezvous;

impl Rendezvous {
    /// Waits for `size` members on `listener` (each proving the secret), then sends every
    /// member the table of all members' addresses.
    ///
    /// # Errors
    /// [`CollectiveError::Setup`] if a member misbehaves or does not come in time.
    pub fn serve(listener: TcpListener, size: usize, secret: &str, timeout: Duration) -> Result<()> {
        let key = auth_key(secret);
        let mut members: Vec<Option<(TcpStream, SocketAddr)>> = (0..size).map(|_| None).collect();
        listener.set_nonblocking(false).map_err(setup)?;
        let deadline = std::time::Instant::now() + timeout;
        let mut joined = 0;
        while joined < size {
            if std::time::Instant::now() > deadline {
                return Err(CollectiveError::Setup(format!("only {joined} of {size} members came")));
            }
            let (mut stream, _) = listener.accept().map_err(setup)?;
            stream.set_read_timeout(Some(timeout)).map_err(setup)?;
            if prove_server(&mut stream, &key).is_err() {
                tracing::warn!("rendezvous refused a member: wrong secret");
                continue;
            }
            match read_meet(&mut stream).map_err(CollectiveError::Setup)? {
                Meet::Join { rank, size: their_size, listen }
                    if their_size as usize == size && (rank as usize) < size =>
                {
                    if members[rank as usize].is_none() {
                        joined += 1;
                    }
                    members[rank as usize] = Some((stream, listen));
                }
                other => {
                    return Err(CollectiveError::Setup(format!("unexpected rendezvous message {other:?}")))
                }
            }
        }
        let addrs: Vec<SocketAddr> = members.iter().flatten().map(|(_, addr)| *addr).collect();
        for (stream, _) in members.iter_mut().flatten() {
            write_meet(stream, &Meet::Table { addrs: addrs.clone() }).map_err(setup)?;
        }
        Ok(())
    }
}

/// Proof of the secret on a raw connection: the server sends a nonce, the client answers
/// with a keyed hash of it (the secret never crosses the wire).
fn prove_server(stream: &mut TcpStream, key: &[u8; 32]) -> std::io::Result<()> {
    let nonce = crate::net::random_nonce_pub();
    stream.write_all(&nonce)?;
    let mut mac = [0u8; 32];
    stream.read_exact(&mut mac)?;
    if blake3::keyed_hash(key, &nonce) == blake3::Hash::from(mac) {
        stream.write_all(&[1])?;
        Ok(())
    } else {
        let _ = stream.write_all(&[0]);
        Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, "wrong cluster secret"))
    }
}

fn prove_client(stream: &mut TcpStream, key: &[u8; 32]) -> std::io::Result<()> {
    let mut nonce = [0u8; 32];
    stream.read_exact(&mut nonce)?;
    stream.write_all(blake3::keyed_hash(key, &nonce).as_bytes())?;
    let mut verdict = [0u8; 1];
    stream.read_exact(&mut verdict)?;
    if verdict[0] == 1 {
        Ok(())
    } else {
        Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, "refused: wrong cluster secret"))
    }
}

fn auth_key(secret: &str) -> [u8; 32] {
    blake3::derive_key("tessera collective group v1", secret.as_bytes())
}

fn setup(error: std::io::Error) -> CollectiveError {
    CollectiveError::Setup(error.to_string())
}

fn write_meet(stream: &mut TcpStream, message: &Meet) -> std::io::Result<()> {
    let payload = bincode::serde::encode_to_vec(message, bincode::config::standard())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    stream.write_all(&(payload.len() as u32).to_le_bytes())?;
    stream.write_all(&payload)
}

fn read_meet(stream: &mut TcpStream) -> std::result::Result<Meet, String> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).map_err(|e| e.to_string())?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME_LEN {
        return Err(format!("rendezvous frame of {len} bytes is too large"));
    }
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).map_err(|e| e.to_string())?;
    decode_frame(&payload).map_err(|e| e.to_string())
}

/// A borrowed buffer handed to a writer thread; the sender waits for the writer to finish
/// with it before the borrow ends.
struct Outgoing {
    ptr: *const u8,
    len: usize,
    done: mpsc::SyncSender<std::io::Result<()>>,
}

// SAFETY: `Outgoing` is only created by `Peer::send`, which blocks until the writer thread
// has signalled `done`; the pointed-to bytes outlive every use on the writer thread.
unsafe impl Send for Outgoing {}

struct Peer {
    rank: usize,
    reader: TcpStream,
    outgoing: mpsc::Sender<Outgoing>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.reader.shutdown(std::net::Shutdown::Both);
        let (tx, _) = mpsc::channel();
        self.outgoing = tx; // closes the writer's queue
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// A send in progress; `wait` returns once the bytes are written.
struct Sending<'a> {
    done: mpsc::Receiver<std::io::Result<()>>,
    _bytes: std::marker::PhantomData<&'a [u8]>,
}

impl Peer {
    fn send<'a>(&self, bytes: &'a [u8]) -> Sending<'a> {
        let (done, wait) = mpsc::sync_channel(1);
        let outgoing = Outgoing { ptr: bytes.as_ptr(), len: bytes.len(), done };
        if let Err(mpsc::SendError(outgoing)) = self.outgoing.send(outgoing) {
            let _ = outgoing
                .done
                .send(Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "writer stopped")));
        }
        Sending { done: wait, _bytes: std::marker::PhantomData }
    }
}

impl Sending<'_> {
    fn wait(self) -> std::io::Result<()> {
        self.done
            .recv()
            .unwrap_or_else(|_| Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "writer stopped")))
    }
}

impl Drop for Sending<'_> {
    fn drop(&mut self) {
        // The writer may still read the borrowed bytes: wait until it is done with them.
        let _ = self.done.recv();
    }
}

fn writer_loop(mut stream: TcpStream, queue: mpsc::Receiver<Outgoing>) {
    while let Ok(outgoing) = queue.recv() {
        // SAFETY: see `Outgoing`: the sender keeps the buffer alive until `done` is sent.
        let bytes = unsafe { std::slice::from_raw_parts(outgoing.ptr, outgoing.len) };
        let result = stream.write_all(bytes);
        let _ = outgoing.done.send(result);
    }
}

/// Messages up to this size are exchanged whole between all ranks; larger ones use the ring.
const SMALL_MESSAGE: usize = 256 << 10;
/// Send and receive buffer size asked of the kernel for group sockets. Both ends' buffers
/// together hold far more than a small message, so small messages are written directly
/// from the calling thread before it reads: no peer can block such a write.
const SOCKET_BUFFER: usize = 4 << 20;

/// Sets a socket's kernel send and receive buffer sizes.
fn set_socket_buffers(stream: &TcpStream, bytes: usize) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    for option in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: a valid socket descriptor, a pointer to a c_int and its exact size.
        let result = unsafe {
            libc::setsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if result != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
/// Received ring segments are reduced in pieces of this many bytes, overlapping the receive.
const PIECE: usize = 1 << 20;

/// The first half of joining a group without a rendezvous server: a member binds its
/// listener, someone (a cluster head, through actor messages) collects every member's
/// [`addr`](GroupListener::addr) and hands the full table to each member's
/// [`connect`](GroupListener::connect).
///
/// # Examples
/// ```
/// use std::time::Duration;
/// use tessera::{Communicator, GroupListener};
///
/// let ip = std::net::IpAddr::from([127, 0, 0, 1]);
/// let members: Vec<GroupListener> = (0..2)
///     .map(|rank| GroupListener::bind(rank, 2, ip, "secret", Duration::from_secs(5)))
///     .collect::<Result<_, _>>()?;
/// let table: Vec<_> = members.iter().map(GroupListener::addr).collect();
/// let threads: Vec<_> = members
///     .into_iter()
///     .map(|m| {
///         let table = table.clone();
///         std::thread::spawn(move || -> Result<f32, tessera::CollectiveError> {
///             let mut group = m.connect(&table)?;
///             let mut data = [group.rank() as f32 + 1.0];
///             group.all_reduce(&mut data)?;
///             Ok(data[0])
///         })
///     })
///     .collect();
/// for t in threads {
///     assert_eq!(t.join().unwrap()?, 3.0);
/// }
/// # Ok::<(), tessera::CollectiveError>(())
/// ```
#[derive(Debug)]
pub struct GroupListener {
    rank: usize,
    size: usize,
    key: [u8; 32],
    timeout: Duration,
    listener: TcpListener,
    addr: SocketAddr,
}

impl GroupListener {
    /// Rank `rank` of `size` listens for its peers on `ip` (an ephemeral port), proving
    /// `secret`; a peer silent for `timeout` fails an operation.
    ///
    /// # Errors
    /// [`CollectiveError::InvalidArgument`] for a rank outside the group;
    /// [`CollectiveError::Setup`] if it cannot listen.
    pub fn bind(rank: usize, size: usize, ip: IpAddr, secret: &str, timeout: Duration) -> Result<Self> {
        if size == 0 || rank >= size {
            return Err(CollectiveError::InvalidArgument {
                op: "join",
                message: format!("rank {rank} of {size}"),
            });
        }
        let listener = TcpListener::bind((ip, 0)).map_err(setup)?;
        let addr = listener.local_addr().map_err(setup)?;
        Ok(GroupListener { rank, size, key: auth_key(secret), timeout, listener, addr })
    }

    /// Where the peers reach this member.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connects to every other member (`addrs[r]` is rank r's [`addr`](Self::addr)): dials
    /// the lower ranks, accepts the higher ones. Every member must call it at about the same
    /// time (within the timeout).
    ///
    /// # Errors
    /// [`CollectiveError::InvalidArgument`] if the table's length is not the group size;
    /// [`CollectiveError::Setup`] if a peer cannot be reached, refuses, or does not come.
    pub fn connect(self, addrs: &[SocketAddr]) -> Result<TcpGroup> {
        let GroupListener { rank, size, key, timeout, listener, .. } = self;
        if addrs.len() != size {
            return Err(CollectiveError::InvalidArgument {
                op: "connect",
                message: format!("{} addresses for a group of {size}", addrs.len()),
            });
        }
        let mut streams: Vec<Option<TcpStream>> = (0..size).map(|_| None).collect();
        // Connect to lower ranks; accept higher ranks.
        for (peer, addr) in addrs.iter().enumerate().take(rank) {
            let mut stream = connect_retrying(*addr, timeout)?;
            stream.set_read_timeout(Some(timeout)).map_err(setup)?;
            prove_client(&mut stream, &key).map_err(setup)?;
            write_meet(&mut stream, &Meet::Hello { rank: rank as u32 }).map_err(setup)?;
            streams[peer] = Some(stream);
        }
        let deadline = std::time::Instant::now() + timeout.max(Duration::from_secs(30));
        listener.set_nonblocking(true).map_err(setup)?;
        let mut expected = size - rank - 1;
        while expected > 0 {
            let mut stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if std::time::Instant::now() > deadline {
                        let missing: Vec<usize> =
                            (rank + 1..size).filter(|&r| streams[r].is_none()).collect();
                        return Err(CollectiveError::Setup(format!(
                            "rank {rank}: ranks {missing:?} did not connect in time"
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                }
                Err(e) => return Err(setup(e)),
            };
            stream.set_nonblocking(false).map_err(setup)?;
            stream.set_read_timeout(Some(timeout)).map_err(setup)?;
            if prove_server(&mut stream, &key).is_err() {
                tracing::warn!(rank, "refused a group connection: wrong secret");
                continue;
            }
            match read_meet(&mut stream).map_err(CollectiveError::Setup)? {
                Meet::Hello { rank: peer } if (peer as usize) > rank && (peer as usize) < size => {
                    if streams[peer as usize].replace(stream).is_none() {
                        expected -= 1;
                    }
                }
                other => return Err(CollectiveError::Setup(format!("unexpected hello {other:?}"))),
            }
        }
        let mut peers = Vec::with_capacity(size);
        for (peer, stream) in streams.into_iter().enumerate() {
            let Some(stream) = stream else {
                peers.push(None);
                continue;
            };
            stream.set_nodelay(true).map_err(setup)?;
            stream.set_write_timeout(Some(timeout)).map_err(setup)?;
            set_socket_buffers(&stream, SOCKET_BUFFER).map_err(setup)?;
            let write_half = stream.try_clone().map_err(setup)?;
            let (outgoing, queue) = mpsc::channel();
            let writer = std::thread::Builder::new()
                .name(format!("tessera-coll-{rank}-{peer}"))
                .spawn(move || writer_loop(write_half, queue))
                .map_err(setup)?;
            peers.push(Some(Peer { rank: peer, reader: stream, outgoing, writer: Some(writer) }));
        }
        Ok(TcpGroup { rank, size, timeout, peers, scratch: Vec::new() })
    }
}

/// A collective group over TCP connections between every pair of ranks.
pub struct TcpGroup {
    rank: usize,
    size: usize,
    timeout: Duration,
    /// Peers by rank (`None` at this rank's own index).
    peers: Vec<Option<Peer>>,
    scratch: Vec<u8>,
}

impl std::fmt::Debug for TcpGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpGroup").field("rank", &self.rank).field("size", &self.size).finish()
    }
}

impl TcpGroup {
    /// Joins a group: meets the others at the rendezvous, then connects to each of them.
    ///
    /// # Errors
    /// [`CollectiveError::Setup`] if the rendezvous or a peer cannot be reached or refuses.
    pub fn join(config: GroupConfig) -> Result<TcpGroup> {
        let GroupConfig { rank, size, rendezvous, secret, timeout } = config;
        let listener = GroupListener::bind(rank, size, IpAddr::from([127, 0, 0, 1]), &secret, timeout)?;
        let mut meet = connect_retrying(rendezvous, timeout)?;
        meet.set_read_timeout(Some(timeout.max(Duration::from_secs(30)))).map_err(setup)?;
        prove_client(&mut meet, &listener.key).map_err(setup)?;
        let join = Meet::Join { rank: rank as u32, size: size as u32, listen: listener.addr };
        write_meet(&mut meet, &join).map_err(setup)?;
        let addrs = match read_meet(&mut meet).map_err(CollectiveError::Setup)? {
            Meet::Table { addrs } if addrs.len() == size => addrs,
            other => return Err(CollectiveError::Setup(format!("unexpected rendezvous reply {other:?}"))),
        };
        listener.connect(&addrs)
    }

    fn peer(&self, rank: usize) -> &Peer {
        self.peers[rank].as_ref().expect("a rank has a peer for every other rank")
    }

    fn lost(&self, rank: usize, op: &'static str, error: std::io::Error) -> CollectiveError {
        match error.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                CollectiveError::Timeout { rank, op, timeout: self.timeout }
            }
            _ => CollectiveError::PeerLost { rank, op, message: error.to_string() },
        }
    }

    fn recv_exact(&self, rank: usize, op: &'static str, buf: &mut [u8]) -> Result<()> {
        (&self.peer(rank).reader).read_exact(buf).map_err(|e| self.lost(rank, op, e))
    }

    /// Sends `bytes` to every peer and receives each peer's message of the same length;
    /// `received[r]` holds rank `r`'s bytes.
    fn exchange_all(&mut self, op: &'static str, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        let mut sends = Vec::with_capacity(self.size);
        if bytes.len() <= SMALL_MESSAGE {
            // Fits in the socket buffers: write directly, no hop through the writer threads.
            for peer in self.peers.iter().flatten() {
                (&peer.reader).write_all(bytes).map_err(|e| self.lost(peer.rank, op, e))?;
            }
        } else {
            for peer in self.peers.iter().flatten() {
                sends.push((peer.rank, peer.send(bytes)));
            }
        }
        let mut received = vec![Vec::new(); self.size];
        for (rank, slot) in received.iter_mut().enumerate() {
            if rank == self.rank {
                continue;
            }
            *slot = vec![0u8; bytes.len()];
            self.recv_exact(rank, op, slot)?;
        }
        for (rank, sending) in sends {
            sending.wait().map_err(|e| self.lost(rank, op, e))?;
        }
        Ok(received)
    }

    /// Ring reduce-scatter: afterwards segment `rank` of `data` holds the sum over ranks.
    fn ring_reduce_scatter(&mut self, op: &'static str, data: &mut [f32]) -> Result<()> {
        let (n, r, len) = (self.size, self.rank, data.len());
        let (right, left) = ((r + 1) % n, (r + n - 1) % n);
        for step in 0..n - 1 {
            let send_index = (r + 2 * n - step - 1) % n;
            let recv_index = (r + 2 * n - step - 2) % n;
            let (send_range, recv_range) = (segment(len, n, send_index), segment(len, n, recv_index));
            let (send, recv) = disjoint(data, send_range, recv_range);
            let sending = self.peer(right).send(as_bytes(send));
            self.recv_reduce(left, op, recv)?;
            sending.wait().map_err(|e| self.lost(right, op, e))?;
        }
        Ok(())
    }

    /// Ring all-gather: segment `rank` of `data` is copied to every rank.
    fn ring_all_gather(&mut self, op: &'static str, data: &mut [f32]) -> Result<()> {
        let (n, r, len) = (self.size, self.rank, data.len());
        let (right, left) = ((r + 1) % n, (r + n - 1) % n);
        for step in 0..n - 1 {
            let send_index = (r + n - step) % n;
            let recv_index = (r + 2 * n - step - 1) % n;
            let (send, recv) = disjoint(data, segment(len, n, send_index), segment(len, n, recv_index));
            let sending = self.peer(right).send(as_bytes(send));
            self.recv_exact(left, op, as_bytes_mut(recv))?;
            sending.wait().map_err(|e| self.lost(right, op, e))?;
        }
        Ok(())
    }

    /// Receives `target.len()` floats from `rank` and adds them in, piece by piece.
    fn recv_reduce(&mut self, rank: usize, op: &'static str, target: &mut [f32]) -> Result<()> {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.resize(PIECE, 0);
        let floats_per_piece = PIECE / 4;
        let mut result = Ok(());
        for piece in target.chunks_mut(floats_per_piece) {
            let bytes = &mut scratch[..piece.len() * 4];
            if let Err(e) = self.recv_exact(rank, op, bytes) {
                result = Err(e);
                break;
            }
            for (x, b) in piece.iter_mut().zip(bytes.chunks_exact(4)) {
                *x += f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        self.scratch = scratch;
        result
    }
}

fn connect_retrying(addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match TcpStream::connect(addr) {
            Ok(stream) => return Ok(stream),
            Err(e) if std::time::Instant::now() < deadline => {
                tracing::debug!(%addr, error = %e, "group peer not reachable yet");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(CollectiveError::Setup(format!("cannot reach {addr}: {e}"))),
        }
    }
}

/// Two disjoint sub-slices of `data` (either may be empty).
fn disjoint(
    data: &mut [f32],
    first: std::ops::Range<usize>,
    second: std::ops::Range<usize>,
) -> (&mut [f32], &mut [f32]) {
    if first.end <= second.start {
        let (a, b) = data.split_at_mut(second.start);
        (&mut a[first], &mut b[..second.end - second.start])
    } else {
        let (a, b) = data.split_at_mut(first.start);
        let (first_len, second) = (first.end - first.start, second);
        (&mut b[..first_len], &mut a[second])
    }
}

fn as_bytes(data: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding or invalid bit patterns; the byte view covers the same memory.
    // Tessera only targets little-endian machines, where this is the wire layout.
    unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), std::mem::size_of_val(data)) }
}

fn as_bytes_mut(data: &mut [f32]) -> &mut [u8] {
    // SAFETY: as in `as_bytes`; every byte pattern is a valid f32.
    unsafe { std::slice::from_raw_parts_mut(data.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(data)) }
}

fn floats(bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

impl Communicator for TcpGroup {
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
        if std::mem::size_of_val(data) <= SMALL_MESSAGE || data.len() < self.size {
            let received = self.exchange_all("all_reduce", as_bytes(data))?;
            // Sum in rank order on every rank: identical bits everywhere.
            let mut sum = vec![0f32; data.len()];
            for (rank, bytes) in received.iter().enumerate() {
                if rank == self.rank {
                    sum.iter_mut().zip(data.iter()).for_each(|(s, x)| *s += *x);
                } else {
                    sum.iter_mut().zip(floats(bytes)).for_each(|(s, x)| *s += x);
                }
            }
            data.copy_from_slice(&sum);
            return Ok(());
        }
        self.ring_reduce_scatter("all_reduce", data)?;
        self.ring_all_gather("all_reduce", data)
    }

    fn broadcast(&mut self, data: &mut [f32], root: usize) -> Result<()> {
        if root >= self.size {
            return Err(CollectiveError::InvalidArgument {
                op: "broadcast",
                message: format!("root {root} of {}", self.size),
            });
        }
        if self.size == 1 {
            return Ok(());
        }
        if self.rank == root {
            let bytes = as_bytes(data);
            let sends: Vec<_> = self.peers.iter().flatten().map(|p| (p.rank, p.send(bytes))).collect();
            for (rank, sending) in sends {
                sending.wait().map_err(|e| self.lost(rank, "broadcast", e))?;
            }
            Ok(())
        } else {
            self.recv_exact(root, "broadcast", as_bytes_mut(data))
        }
    }

    fn all_gather(&mut self, local: &[f32], out: &mut [f32]) -> Result<()> {
        if out.len() != local.len() * self.size {
            return Err(CollectiveError::InvalidArgument {
                op: "all_gather",
                message: format!("out has {} elements, expected {} × {}", out.len(), self.size, local.len()),
            });
        }
        let n = local.len();
        out[self.rank * n..(self.rank + 1) * n].copy_from_slice(local);
        if self.size == 1 || n == 0 {
            return Ok(());
        }
        let received = self.exchange_all("all_gather", as_bytes(local))?;
        for (rank, bytes) in received.iter().enumerate() {
            if rank != self.rank {
                out[rank * n..(rank + 1) * n].iter_mut().zip(floats(bytes)).for_each(|(o, x)| *o = x);
            }
        }
        Ok(())
    }

    fn reduce_scatter(&mut self, data: &mut [f32], out: &mut [f32]) -> Result<()> {
        let mine = segment(data.len(), self.size, self.rank);
        if out.len() != mine.len() {
            return Err(CollectiveError::InvalidArgument {
                op: "reduce_scatter",
                message: format!("out has {} elements, this rank's segment has {}", out.len(), mine.len()),
            });
        }
        if self.size > 1 && !data.is_empty() {
            self.ring_reduce_scatter("reduce_scatter", data)?;
        }
        out.copy_from_slice(&data[mine]);
        Ok(())
    }

    fn barrier(&mut self) -> Result<()> {
        if self.size == 1 {
            return Ok(());
        }
        self.exchange_all("barrier", &[0u8]).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_cover_the_buffer_without_overlap() {
        for len in [0, 1, 5, 7, 1000] {
            for parts in 1..=5 {
                let mut next = 0;
                for i in 0..parts {
                    let s = segment(len, parts, i);
                    assert_eq!(s.start, next);
                    next = s.end;
                }
                assert_eq!(next, len);
            }
        }
    }

    #[test]
    fn disjoint_slices_in_either_order() {
        let mut data: Vec<f32> = (0..10).map(|x| x as f32).collect();
        let (a, b) = disjoint(&mut data, 0..3, 5..10);
        assert_eq!((a[0], b[0]), (0.0, 5.0));
        let (a, b) = disjoint(&mut data, 6..8, 1..4);
        assert_eq!((a.len(), a[0], b.len(), b[0]), (2, 6.0, 3, 1.0));
        let (a, b) = disjoint(&mut data, 0..1, 0..0);
        assert_eq!((a.len(), b.len()), (1, 0));
        let (a, b) = disjoint(&mut data, 0..0, 0..1);
        assert_eq!((a.len(), b.len()), (0, 1));
    }
}
