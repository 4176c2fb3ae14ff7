//! Collective communication among a fixed group of ranks: all-reduce, broadcast,
//! all-gather, reduce-scatter and barrier, behind one [`Communicator`] trait.
//!
//! The TCP backend ([`TcpGroup`]) connects every pair of ranks once (authenticated with the
//! cluster secret). The calling thread drives every connection itself: small messages with
//! blocking writes then reads, large ones with non-blocking sends and receives multiplexed by
//! `poll(2)`, so a rank sends and receives at once without helper threads.
//!
//! # Ordering and determinism
//! Every rank reduces in one fixed order, so all ranks hold bit-identical results: small
//! messages are exchanged whole and summed in rank order 0, 1, …; large ones use a ring
//! (reduce-scatter then all-gather, pipelined so that both phases stream together), where
//! each segment is summed along the ring once and then copied.
//!
//! # Failure
//! A peer that closes its connection, or sends nothing for longer than the group's timeout,
//! fails the operation on every other rank with an error naming that rank — never a hang.
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
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
    /// The backend gave up on a collective that the other ranks did not complete and
    /// aborted the group (NCCL's watchdog: the collective ran past the group's timeout, or
    /// NCCL reported that a rank's process or the network failed). Every later collective
    /// of the group fails with the same reason.
    #[error("{op} did not complete and the group was aborted: {reason}")]
    Aborted {
        /// The collective that did not complete.
        op: &'static str,
        /// Why the group was aborted.
        reason: String,
    },
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

/// Errors unless `root` is a rank of a group of `size` (broadcast).
pub(crate) fn check_root(root: usize, size: usize) -> Result<()> {
    if root >= size {
        return Err(CollectiveError::InvalidArgument {
            op: "broadcast",
            message: format!("root {root} of {size}"),
        });
    }
    Ok(())
}

/// Errors unless an all-gather's `out` holds `size` times `local`.
pub(crate) fn check_gather(local: usize, out: usize, size: usize) -> Result<()> {
    if out != local * size {
        return Err(CollectiveError::InvalidArgument {
            op: "all_gather",
            message: format!("out has {out} elements, expected {size} × {local}"),
        });
    }
    Ok(())
}

/// Errors unless a reduce-scatter's `out` holds this rank's segment (`mine` elements).
pub(crate) fn check_scatter(out: usize, mine: usize) -> Result<()> {
    if out != mine {
        return Err(CollectiveError::InvalidArgument {
            op: "reduce_scatter",
            message: format!("out has {out} elements, this rank's segment has {mine}"),
        });
    }
    Ok(())
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

/// One connection to a peer. Every collective drives its connections from the calling
/// thread: small messages with blocking writes and reads, large ones with non-blocking calls
/// multiplexed by `poll(2)`, so a rank sends and receives at once without helper threads
/// (on a machine with few cores, one busy thread per rank is what keeps every core working).
struct Peer {
    rank: usize,
    stream: TcpStream,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// Maps a non-blocking call's return value: the byte count, 0 if the call would block or was
/// interrupted, or the error.
fn nonblocking_result(returned: isize) -> std::io::Result<usize> {
    if let Ok(count) = usize::try_from(returned) {
        return Ok(count);
    }
    let error = std::io::Error::last_os_error();
    match error.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => Ok(0),
        _ => Err(error),
    }
}

/// Writes what the socket takes now of `bytes`, without blocking.
fn send_some(stream: &TcpStream, bytes: &[u8]) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid socket descriptor and a readable buffer of exactly `bytes.len()` bytes.
    let sent = unsafe {
        libc::send(
            stream.as_raw_fd(),
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    nonblocking_result(sent)
}

/// Reads what the socket has now into `buf`, without blocking; a closed connection is an error.
fn recv_some(stream: &TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    if buf.is_empty() {
        return Ok(0);
    }
    // SAFETY: a valid socket descriptor and a writable buffer of exactly `buf.len()` bytes.
    let received =
        unsafe { libc::recv(stream.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if received == 0 {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed"));
    }
    nonblocking_result(received)
}

/// Adds `incoming` to `target` element by element (`target[i] + incoming[i]`, the order every
/// rank uses); a plain loop over equal-length slices, which the compiler vectorizes.
fn add_into(target: &mut [f32], incoming: &[f32]) {
    for (x, y) in target.iter_mut().zip(incoming) {
        *x += *y;
    }
}

/// Messages up to this size are exchanged whole between all ranks; larger ones use the ring.
const SMALL_MESSAGE: usize = 256 << 10;
/// Groups up to this size reduce small messages in one direct exchange (one round, every
/// rank sends to every other); larger groups use recursive doubling (⌈log2 n⌉ rounds, one
/// partner per round), so the messages per rank grow with log n rather than n.
const DIRECT_EXCHANGE_MAX_RANKS: usize = 4;
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
/// The most bytes one non-blocking read takes into the reduce buffer; whatever whole floats a
/// read brings are reduced and forwarded at once.
const PIECE: usize = 256 << 10;

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
            peers.push(Some(Peer { rank: peer, stream }));
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
    /// The reduce buffer of the ring, kept between operations.
    scratch: Vec<f32>,
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

    /// Sums a small `data` over the group by recursive doubling. With p the largest power
    /// of two ≤ n, rank p + i first folds its data into rank i (and gets the result back at
    /// the end); the first p ranks then exchange with the partner `rank ^ d` for d = 1, 2,
    /// 4, …. Partners add the same two values (in either order: the same bits), so every
    /// rank ends with the same bits. Messages fit the socket buffers,
    /// so each round's blocking write cannot wait on the partner's read.
    fn recursive_doubling(&mut self, op: &'static str, data: &mut [f32]) -> Result<()> {
        let (rank, size) = (self.rank, self.size);
        let p = 1usize << (usize::BITS - 1 - size.leading_zeros());
        let send = |group: &Self, to: usize, data: &[f32]| {
            (&group.peer(to).stream).write_all(as_bytes(data)).map_err(|e| group.lost(to, op, e))
        };
        if rank >= p {
            send(self, rank - p, data)?;
            return self.recv_exact(rank - p, op, as_bytes_mut(data));
        }
        let mut theirs = vec![0f32; data.len()];
        if rank + p < size {
            self.recv_exact(rank + p, op, as_bytes_mut(&mut theirs))?;
            data.iter_mut().zip(&theirs).for_each(|(mine, their)| *mine += *their);
        }
        let mut distance = 1;
        while distance < p {
            let partner = rank ^ distance;
            send(self, partner, data)?;
            self.recv_exact(partner, op, as_bytes_mut(&mut theirs))?;
            // a + b and b + a are the same bits (IEEE addition commutes), so both partners
            // hold the same sums after every round.
            data.iter_mut().zip(&theirs).for_each(|(mine, their)| *mine += *their);
            distance <<= 1;
        }
        if rank + p < size {
            send(self, rank + p, data)?;
        }
        Ok(())
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
        (&self.peer(rank).stream).read_exact(buf).map_err(|e| self.lost(rank, op, e))
    }

    /// Waits until one of `fds` is ready; `blame` is the rank named if none is within the
    /// timeout.
    fn poll(&self, op: &'static str, fds: &mut [libc::pollfd], blame: usize) -> Result<()> {
        let timeout_ms = libc::c_int::try_from(self.timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        loop {
            // SAFETY: `fds` is a valid array of `fds.len()` pollfd structures.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
            match ready {
                0 => return Err(CollectiveError::Timeout { rank: blame, op, timeout: self.timeout }),
                r if r > 0 => return Ok(()),
                _ => {
                    let error = std::io::Error::last_os_error();
                    if error.kind() != std::io::ErrorKind::Interrupted {
                        return Err(CollectiveError::Backend { op, message: format!("poll: {error}") });
                    }
                }
            }
        }
    }

    fn pollfd(&self, rank: usize, events: libc::c_short) -> libc::pollfd {
        use std::os::fd::AsRawFd;
        libc::pollfd { fd: self.peer(rank).stream.as_raw_fd(), events, revents: 0 }
    }

    /// Sends `sends[i].1` to rank `sends[i].0` and fills each `recvs[j].1` from rank
    /// `recvs[j].0`, all at once from this thread.
    fn transfer(
        &self,
        op: &'static str,
        sends: &[(usize, &[u8])],
        recvs: &mut [(usize, &mut [u8])],
    ) -> Result<()> {
        let mut sent = vec![0usize; sends.len()];
        let mut got = vec![0usize; recvs.len()];
        let mut fds = Vec::with_capacity(sends.len() + recvs.len());
        // For each entry of `fds`: a send (true) or a receive, and its index.
        let mut which = Vec::with_capacity(sends.len() + recvs.len());
        loop {
            fds.clear();
            which.clear();
            for (j, (rank, buf)) in recvs.iter().enumerate() {
                if got[j] < buf.len() {
                    fds.push(self.pollfd(*rank, libc::POLLIN));
                    which.push((false, j));
                }
            }
            for (i, (rank, bytes)) in sends.iter().enumerate() {
                if sent[i] < bytes.len() {
                    fds.push(self.pollfd(*rank, libc::POLLOUT));
                    which.push((true, i));
                }
            }
            let Some(&(is_send, index)) = which.first() else {
                return Ok(());
            };
            // A missing receive is blamed on its sender; else on the peer not taking our bytes.
            let blame = if is_send { sends[index].0 } else { recvs[index].0 };
            self.poll(op, &mut fds, blame)?;
            for (fd, &(is_send, index)) in fds.iter().zip(&which) {
                if fd.revents == 0 {
                    continue;
                }
                if is_send {
                    let (rank, bytes) = sends[index];
                    sent[index] += send_some(&self.peer(rank).stream, &bytes[sent[index]..])
                        .map_err(|e| self.lost(rank, op, e))?;
                } else {
                    let (rank, buf) = &mut recvs[index];
                    got[index] += recv_some(&self.peer(*rank).stream, &mut buf[got[index]..])
                        .map_err(|e| self.lost(*rank, op, e))?;
                }
            }
        }
    }

    /// Sends `bytes` to every peer and receives each peer's message of the same length;
    /// `received[r]` holds rank `r`'s bytes.
    fn exchange_all(&mut self, op: &'static str, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        let mut received = vec![Vec::new(); self.size];
        if bytes.len() <= SMALL_MESSAGE {
            // Fits in the socket buffers: blocking writes cannot wait on a peer, then read.
            for peer in self.peers.iter().flatten() {
                (&peer.stream).write_all(bytes).map_err(|e| self.lost(peer.rank, op, e))?;
            }
            for (rank, slot) in received.iter_mut().enumerate() {
                if rank != self.rank {
                    *slot = vec![0u8; bytes.len()];
                    self.recv_exact(rank, op, slot)?;
                }
            }
            return Ok(received);
        }
        let sends: Vec<(usize, &[u8])> = self.peers.iter().flatten().map(|p| (p.rank, bytes)).collect();
        for (rank, slot) in received.iter_mut().enumerate() {
            if rank != self.rank {
                *slot = vec![0u8; bytes.len()];
            }
        }
        let mut recvs: Vec<(usize, &mut [u8])> = received
            .iter_mut()
            .enumerate()
            .filter(|(rank, _)| *rank != self.rank)
            .map(|(rank, slot)| (rank, slot.as_mut_slice()))
            .collect();
        self.transfer(op, &sends, &mut recvs)?;
        Ok(received)
    }

    /// The ring, pipelined: reduce-scatter (afterwards segment `rank` of `data` holds the sum
    /// over ranks) and, with `gather`, all-gather after it (afterwards every segment does).
    ///
    /// At step `s` a rank sends one segment to its right and receives one from its left, which
    /// it adds in (reduce-scatter) or stores (all-gather); the segment received at step `s` is
    /// the one sent at step `s + 1`. Rather than running the steps one after another, every
    /// received float is reduced and becomes sendable at once, so all steps of both phases
    /// stream together. Each element is still summed along the ring in the same order.
    fn ring(&mut self, op: &'static str, data: &mut [f32], gather: bool) -> Result<()> {
        let (n, r, len) = (self.size, self.rank, data.len());
        let (right, left) = ((r + 1) % n, (r + n - 1) % n);
        let steps = if gather { 2 * (n - 1) } else { n - 1 };
        // Reduce-scatter step s sends segment r−s−1 and receives r−s−2 (mod n); all-gather
        // step t sends r−t and receives r−t−1.
        let sent_segment = |s: usize| {
            if s < n - 1 {
                segment(len, n, (r + 2 * n - s - 1) % n)
            } else {
                segment(len, n, (r + 2 * n - (s - (n - 1))) % n)
            }
        };
        let received_segment = |s: usize| sent_segment(s + 1);
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.resize(PIECE / 4, 0.0);
        let base = data.as_mut_ptr();
        // SAFETY (for every slice made from `base` below): `data` is exclusively borrowed for
        // this call and used only through `base`; each slice lies inside `data` and lives for
        // one statement, so no two are alive at once. (Values stay right too: a rank receives
        // a float of a segment only after its own send of that float, since the sum that comes
        // back depends on it.)
        let floats = |range: std::ops::Range<usize>| unsafe {
            std::slice::from_raw_parts_mut(base.add(range.start), range.len())
        };
        let (mut send_step, mut sent) = (0usize, 0usize); // bytes of the current send step
        let (mut recv_step, mut got, mut done) = (0usize, 0usize, 0usize); // bytes received, bytes reduced
        let result = loop {
            while send_step < steps && sent == 4 * sent_segment(send_step).len() {
                (send_step, sent) = (send_step + 1, 0);
            }
            while recv_step < steps && done == 4 * received_segment(recv_step).len() {
                (recv_step, got, done) = (recv_step + 1, 0, 0);
            }
            if send_step == steps && recv_step == steps {
                break Ok(());
            }
            // How much of the current send step is final: all of step 0, all of a step whose
            // source was fully received, else what has been reduced of it so far.
            let sendable = match send_step {
                0 => 4 * sent_segment(0).len(),
                s if s - 1 < recv_step => 4 * sent_segment(s).len(),
                s if s - 1 == recv_step => done,
                _ => 0,
            };
            let want_send = send_step < steps && sent < sendable;
            let want_recv = recv_step < steps;
            let mut fds = [libc::pollfd { fd: -1, events: 0, revents: 0 }; 2];
            if want_recv {
                fds[0] = self.pollfd(left, libc::POLLIN);
            }
            if want_send {
                fds[1] = self.pollfd(right, libc::POLLOUT);
            }
            if let Err(e) = self.poll(op, &mut fds, if want_recv { left } else { right }) {
                break Err(e);
            }
            if fds[1].revents != 0 {
                let range = sent_segment(send_step);
                let bytes = &as_bytes(floats(range))[sent..sendable];
                match send_some(&self.peer(right).stream, bytes) {
                    Ok(count) => sent += count,
                    Err(e) => break Err(self.lost(right, op, e)),
                }
            }
            if fds[0].revents != 0 {
                let range = received_segment(recv_step);
                let total = 4 * range.len();
                if recv_step < n - 1 {
                    // Reduce: read into the scratch after the partial float kept from before,
                    // add the whole floats, keep the rest.
                    let kept = got - done;
                    let want = (PIECE - kept).min(total - got);
                    let count = match recv_some(
                        &self.peer(left).stream,
                        &mut as_bytes_mut(&mut scratch)[kept..kept + want],
                    ) {
                        Ok(count) => count,
                        Err(e) => break Err(self.lost(left, op, e)),
                    };
                    got += count;
                    let whole = (got - done) / 4;
                    let start = range.start + done / 4;
                    add_into(floats(start..start + whole), &scratch[..whole]);
                    done += 4 * whole;
                    as_bytes_mut(&mut scratch).copy_within(4 * whole..4 * whole + (got - done), 0);
                } else {
                    let target = &mut as_bytes_mut(floats(range))[got..];
                    match recv_some(&self.peer(left).stream, target) {
                        Ok(count) => got += count,
                        Err(e) => break Err(self.lost(left, op, e)),
                    }
                    done = got;
                }
            }
        };
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
        let small = std::mem::size_of_val(data) <= SMALL_MESSAGE || data.len() < self.size;
        if small && self.size > DIRECT_EXCHANGE_MAX_RANKS && std::mem::size_of_val(data) <= SMALL_MESSAGE {
            return self.recursive_doubling("all_reduce", data);
        }
        if small {
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
        self.ring("all_reduce", data, true)
    }

    fn broadcast(&mut self, data: &mut [f32], root: usize) -> Result<()> {
        check_root(root, self.size)?;
        if self.size == 1 {
            return Ok(());
        }
        if self.rank == root {
            let bytes = as_bytes(data);
            let sends: Vec<(usize, &[u8])> = self.peers.iter().flatten().map(|p| (p.rank, bytes)).collect();
            self.transfer("broadcast", &sends, &mut [])
        } else {
            self.transfer("broadcast", &[], &mut [(root, as_bytes_mut(data))])
        }
    }

    fn all_gather(&mut self, local: &[f32], out: &mut [f32]) -> Result<()> {
        check_gather(local.len(), out.len(), self.size)?;
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
        check_scatter(out.len(), mine.len())?;
        if self.size > 1 && !data.is_empty() {
            self.ring("reduce_scatter", data, false)?;
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
}
