//! The data plane: serving held objects to peers and pulling them from holders, streamed
//! as raw bytes after a `FetchHeader` frame (never relayed through the head).
//!
//! Pulls use blocking sockets on the caller's thread: a transfer is one long sequential
//! read, and a plain `read` into the destination buffer is as fast as the link allows.
use std::collections::HashMap;
use std::future::Future;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;

use super::auth::{client_handshake, ClusterKey};
use super::frame::{decode_frame, encode_frame, read_frame, write_frame, FrameError, MAX_FRAME_LEN};
use super::wire::{Message, Role};
use crate::actors::object::Fetched;
use crate::Error;

/// Where a data server finds the bytes of an object.
pub(crate) trait ObjectSource: Send + Sync + 'static {
    /// The bytes of `id` (or why there are none), made now if need be: this may block, for
    /// example to encode a value or to copy a device array to the host.
    fn object_bytes(&self, id: u64) -> Result<Arc<Vec<u8>>, String>;

    /// The answer for `id` if it is at hand without blocking work; `None` sends the
    /// request to [`object_bytes`](Self::object_bytes) on a blocking thread, so that a slow
    /// first pull never stalls the event loop's other connections.
    fn ready_bytes(&self, _id: u64) -> Option<Result<Arc<Vec<u8>>, String>> {
        None
    }
}

/// The bytes of `id` from `source`, made on a blocking thread when they are not at hand.
async fn bytes_of(source: &Arc<dyn ObjectSource>, id: u64) -> Result<Arc<Vec<u8>>, String> {
    if let Some(ready) = source.ready_bytes(id) {
        return ready;
    }
    let source = source.clone();
    tokio::task::spawn_blocking(move || source.object_bytes(id))
        .await
        .unwrap_or_else(|e| Err(format!("making its bytes failed: {e}")))
}

/// Size of one write when streaming an object.
const STREAM_CHUNK: usize = 4 << 20;

/// Serves `Fetch` requests on an authenticated data connection until it closes.
pub(crate) async fn serve_data(stream: TcpStream, source: Arc<dyn ObjectSource>) -> Result<(), FrameError> {
    let _ = stream.set_nodelay(true);
    let (reader, writer) = stream.into_split();
    let mut reader = BufReader::new(reader);
    let mut writer = BufWriter::with_capacity(1 << 16, writer);
    loop {
        let id = match read_frame::<Message, _>(&mut reader).await? {
            Message::Fetch { id } => id,
            other => {
                return Err(FrameError::Malformed(format!(
                    "unexpected message on a data connection: {other:?}"
                )))
            }
        };
        match bytes_of(&source, id).await {
            Ok(bytes) => {
                write_frame(&mut writer, &Message::FetchHeader { id, len: bytes.len() as u64 }).await?;
                writer.flush().await?;
                for chunk in bytes.chunks(STREAM_CHUNK) {
                    writer.get_mut().write_all(chunk).await?;
                }
            }
            Err(reason) => {
                write_frame(&mut writer, &Message::FetchMissing { id, reason }).await?;
            }
        }
        writer.flush().await?;
    }
}

/// Pulls objects from holders, reusing authenticated connections.
pub(crate) struct DataClient {
    key: ClusterKey,
    name: String,
    idle: Mutex<HashMap<SocketAddr, Vec<std::net::TcpStream>>>,
}

impl DataClient {
    pub(crate) fn new(key: ClusterKey, name: String) -> Self {
        DataClient { key, name, idle: Mutex::new(HashMap::new()) }
    }

    /// Opens and authenticates a connection (the handshake runs on a small private event
    /// loop, then the socket is used in blocking mode).
    fn connect(&self, addr: SocketAddr) -> Result<std::net::TcpStream, String> {
        if let Some(stream) = self.idle.lock().get_mut(&addr).and_then(Vec::pop) {
            return Ok(stream);
        }
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
        let stream = runtime.block_on(async {
            let mut stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
            let _ = stream.set_nodelay(true);
            client_handshake(&mut stream, &self.key, Role::Data, &self.name)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(stream)
        })?;
        let stream = stream.into_std().map_err(|e| e.to_string())?;
        stream.set_nonblocking(false).map_err(|e| e.to_string())?;
        Ok(stream)
    }

    /// Fetches the encoded bytes of object `id` from the holder at `addr`, blocking.
    ///
    /// Safe to call from any thread: inside an async context the pull runs on a helper
    /// thread so that no executor thread blocks.
    pub(crate) fn fetch_blocking(&self, addr: SocketAddr, id: u64) -> Result<Fetched, Error> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return std::thread::scope(|scope| {
                scope.spawn(|| self.fetch_here(addr, id)).join().unwrap_or_else(|_| {
                    Err(Error::Transfer {
                        object: id,
                        holder: addr.to_string(),
                        message: "fetch thread panicked".into(),
                    })
                })
            });
        }
        self.fetch_here(addr, id)
    }

    fn fetch_here(&self, addr: SocketAddr, id: u64) -> Result<Fetched, Error> {
        let failed = |message: String| Error::Transfer { object: id, holder: addr.to_string(), message };
        let mut stream = self.connect(addr).map_err(failed)?;
        match fetch_on(&mut stream, id) {
            Ok(fetched) => {
                self.idle.lock().entry(addr).or_default().push(stream);
                Ok(fetched)
            }
            Err(message) => Err(failed(message)),
        }
    }

    /// Pulls `id` from the holder at `addr` on a thread of its own, for an async caller.
    pub(crate) fn fetch_in_background(
        self: &Arc<Self>,
        addr: SocketAddr,
        id: u64,
    ) -> Pin<Box<dyn Future<Output = Result<Fetched, Error>> + Send>> {
        let data = self.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new().name("tessera-fetch".into()).spawn(move || {
            let _ = tx.send(data.fetch_blocking(addr, id));
        });
        Box::pin(async move {
            spawned.map_err(|e| Error::Cluster(format!("cannot start a fetch thread: {e}")))?;
            rx.await.unwrap_or(Err(Error::Shutdown))
        })
    }

    /// Drops pooled connections to `addr` (its node is gone).
    pub(crate) fn forget(&self, addr: SocketAddr) {
        self.idle.lock().remove(&addr);
    }
}

fn fetch_on(stream: &mut std::net::TcpStream, id: u64) -> Result<Fetched, String> {
    let frame = encode_frame(&Message::Fetch { id }).map_err(|e| e.to_string())?;
    stream.write_all(&frame).map_err(|e| e.to_string())?;
    let len = match read_frame_blocking(stream)? {
        Message::FetchHeader { id: got, len } if got == id => len,
        Message::FetchMissing { reason, .. } => return Err(format!("holder does not have it: {reason}")),
        other => return Err(format!("unexpected reply {other:?}")),
    };
    let len = usize::try_from(len).map_err(|_| format!("object of {len} bytes is too large"))?;
    // The first bytes may be a length prefix (byte vectors): read them apart, so that a
    // byte vector's body can be adopted without a copy.
    let mut head = Vec::with_capacity(9);
    if len > 0 {
        let mut first = [0u8; 1];
        stream.read_exact(&mut first).map_err(|e| e.to_string())?;
        head.push(first[0]);
        let extra = match first[0] {
            251 => 2,
            252 => 4,
            253 => 8,
            _ => 0,
        }
        .min(len - 1);
        head.resize(1 + extra, 0);
        stream.read_exact(&mut head[1..]).map_err(|e| e.to_string())?;
    }
    let body_len = len - head.len();
    let mut body = Vec::new();
    body.try_reserve_exact(body_len).map_err(|e| format!("cannot allocate {body_len} bytes: {e}"))?;
    let started = std::time::Instant::now();
    let read = stream.take(body_len as u64).read_to_end(&mut body).map_err(|e| e.to_string())?;
    if read != body_len {
        return Err(format!("connection closed after {} of {len} bytes", read + head.len()));
    }
    tracing::debug!(id, len, seconds = started.elapsed().as_secs_f64(), "fetched");
    Ok(Fetched { head, body })
}

fn read_frame_blocking(stream: &mut std::net::TcpStream) -> Result<Message, String> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).map_err(|e| e.to_string())?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::Oversized { len, limit: MAX_FRAME_LEN }.to_string());
    }
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).map_err(|e| e.to_string())?;
    decode_frame(&payload).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;
    use crate::net::auth::server_handshake;

    /// Object 1 takes until object 2 has been asked for (a slow first pull, as a device
    /// array's copy to the host); object 2 is at hand.
    struct SlowFirstPull {
        started: Mutex<Option<mpsc::Sender<()>>>,
        second_asked: Mutex<Option<mpsc::Sender<()>>>,
        second_seen: Mutex<mpsc::Receiver<()>>,
    }

    impl ObjectSource for SlowFirstPull {
        fn object_bytes(&self, id: u64) -> Result<Arc<Vec<u8>>, String> {
            assert_eq!(id, 1, "only object 1 needs work");
            if let Some(started) = self.started.lock().take() {
                let _ = started.send(());
            }
            self.second_seen
                .lock()
                .recv_timeout(Duration::from_secs(10))
                .map_err(|_| "object 2 was not served while object 1 was being made".to_string())?;
            Ok(Arc::new(vec![1; 100]))
        }

        fn ready_bytes(&self, id: u64) -> Option<Result<Arc<Vec<u8>>, String>> {
            (id == 2).then(|| {
                if let Some(asked) = self.second_asked.lock().take() {
                    let _ = asked.send(());
                }
                Ok(Arc::new(vec![2; 100]))
            })
        }
    }

    #[test]
    fn a_slow_object_does_not_stall_other_connections() -> anyhow::Result<()> {
        let key = ClusterKey::from_secret("data plane test");
        let (started_tx, started_rx) = mpsc::channel();
        let (asked_tx, asked_rx) = mpsc::channel();
        let source = Arc::new(SlowFirstPull {
            started: Mutex::new(Some(started_tx)),
            second_asked: Mutex::new(Some(asked_tx)),
            second_seen: Mutex::new(asked_rx),
        });
        // One event-loop thread serves every connection, as a node's data service might.
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        let server_key = key.clone();
        let server = std::thread::spawn(move || {
            runtime.block_on(async move {
                loop {
                    let Ok((mut stream, _)) = listener.accept().await else { return };
                    let key = server_key.clone();
                    let source: Arc<dyn ObjectSource> = source.clone();
                    tokio::spawn(async move {
                        if server_handshake(&mut stream, &key).await.is_ok() {
                            let _ = serve_data(stream, source).await;
                        }
                    });
                }
            });
        });
        drop(server);

        let first_client = DataClient::new(key.clone(), "first".into());
        let first = std::thread::spawn(move || first_client.fetch_blocking(addr, 1));
        started_rx.recv_timeout(Duration::from_secs(10))?;
        let second = DataClient::new(key, "second".into()).fetch_blocking(addr, 2)?;
        assert_eq!(second.into_bytes(), vec![2; 100]);
        let first = first.join().map_err(|_| anyhow::anyhow!("fetch thread panicked"))??;
        assert_eq!(first.into_bytes(), vec![1; 100]);
        Ok(())
    }
}
