//! The handshake: version check and mutual challenge-response over the cluster secret.
//!
//! The secret never crosses the wire. Both sides derive a key from it; the server sends a
//! random nonce, the client answers with a keyed BLAKE3 MAC over both nonces, and the server
//! proves itself the same way. A wrong version or proof is refused, logged, and the
//! connection closed.
//!
//! Before the proof, frames are small (`HANDSHAKE_FRAME_LIMIT`) and the peer's name is
//! checked (`check_peer_name`), so that a peer without the secret can neither make this
//! process hold a large buffer nor write what it likes into its logs. The client gives up
//! on a server that does not answer within `HANDSHAKE_TIMEOUT`.
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::frame::{read_frame_within, write_frame, FrameError};
use super::wire::{Message, Role, MAGIC, PROTOCOL_VERSION};

/// The largest handshake frame: a `Hello` with a name of `MAX_PEER_NAME` bytes fits.
const HANDSHAKE_FRAME_LIMIT: usize = 1024;

/// The longest peer name, in bytes.
pub(crate) const MAX_PEER_NAME: usize = 255;

/// How long a client waits for the server's side of the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How many handshakes a server runs at once; a connection beyond them is closed at once
/// (each one not done holds a socket for up to `HANDSHAKE_TIMEOUT`).
pub(crate) const MAX_PENDING_HANDSHAKES: usize = 256;

/// A server's count of handshakes in progress.
#[derive(Clone)]
pub(crate) struct HandshakeGate(std::sync::Arc<tokio::sync::Semaphore>);

impl HandshakeGate {
    pub(crate) fn new() -> Self {
        HandshakeGate(std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES)))
    }

    /// A place for one more handshake (held until it is dropped), or `None` when
    /// [`MAX_PENDING_HANDSHAKES`] are in progress.
    pub(crate) fn admit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.0.clone().try_acquire_owned().ok()
    }
}

/// The key both sides derive from the cluster secret.
#[derive(Clone)]
pub(crate) struct ClusterKey([u8; 32]);

impl ClusterKey {
    pub(crate) fn from_secret(secret: &str) -> Self {
        ClusterKey(blake3::derive_key("tessera cluster secret v1", secret.as_bytes()))
    }

    fn mac(&self, label: &[u8], first: &[u8; 32], second: &[u8; 32]) -> blake3::Hash {
        let mut hasher = blake3::Hasher::new_keyed(&self.0);
        hasher.update(label);
        hasher.update(first);
        hasher.update(second);
        hasher.finalize()
    }
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("refused: {0}")]
    Refused(String),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
}

/// Why `name` cannot name a peer (nodes name themselves; the name shows in logs and
/// errors): empty, longer than [`MAX_PEER_NAME`] bytes, or with control characters.
pub(crate) fn check_peer_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_PEER_NAME || name.chars().any(char::is_control) {
        return Err(format!(
            "a peer's name must be 1 to {MAX_PEER_NAME} bytes without control characters, not {:?}",
            name.chars().take(64).collect::<String>()
        ));
    }
    Ok(())
}

pub(crate) fn random_nonce() -> [u8; 32] {
    let mut nonce = [0u8; 32];
    if getrandom::fill(&mut nonce).is_err() {
        // Fall back to a time-and-address-derived nonce; still unique per connection.
        let seed = format!("{:?}{:?}", std::time::SystemTime::now(), &nonce as *const _);
        nonce = *blake3::hash(seed.as_bytes()).as_bytes();
    }
    nonce
}

/// Client side: proves knowledge of the secret and checks the server's proof; gives up
/// after [`HANDSHAKE_TIMEOUT`].
pub(crate) async fn client_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    key: &ClusterKey,
    role: Role,
    name: &str,
) -> Result<(), HandshakeError> {
    client_handshake_within(stream, key, role, name, HANDSHAKE_TIMEOUT).await
}

async fn client_handshake_within<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    key: &ClusterKey,
    role: Role,
    name: &str,
    timeout: Duration,
) -> Result<(), HandshakeError> {
    match tokio::time::timeout(timeout, client_steps(stream, key, role, name)).await {
        Ok(result) => result,
        Err(_) => Err(HandshakeError::TimedOut(timeout)),
    }
}

async fn client_steps<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    key: &ClusterKey,
    role: Role,
    name: &str,
) -> Result<(), HandshakeError> {
    write_frame(
        stream,
        &Message::Hello { magic: MAGIC, version: PROTOCOL_VERSION, role, name: name.to_string() },
    )
    .await?;
    stream.flush().await.map_err(FrameError::from)?;
    let nonce = match read_frame_within::<Message, _>(stream, HANDSHAKE_FRAME_LIMIT).await? {
        Message::Challenge { nonce } => nonce,
        Message::Refused { reason } => return Err(HandshakeError::Refused(reason)),
        other => return Err(HandshakeError::Protocol(format!("expected a challenge, got {other:?}"))),
    };
    let client_nonce = random_nonce();
    let mac = *key.mac(b"client", &nonce, &client_nonce).as_bytes();
    write_frame(stream, &Message::Proof { client_nonce, mac }).await?;
    stream.flush().await.map_err(FrameError::from)?;
    match read_frame_within::<Message, _>(stream, HANDSHAKE_FRAME_LIMIT).await? {
        Message::Welcome { mac } => {
            if key.mac(b"server", &client_nonce, &nonce) == blake3::Hash::from(mac) {
                Ok(())
            } else {
                Err(HandshakeError::Refused("the server does not know the cluster secret".into()))
            }
        }
        Message::Refused { reason } => Err(HandshakeError::Refused(reason)),
        other => Err(HandshakeError::Protocol(format!("expected a welcome, got {other:?}"))),
    }
}

/// Server side: returns the peer's role and name once it has proven the secret.
pub(crate) async fn server_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    key: &ClusterKey,
) -> Result<(Role, String), HandshakeError> {
    let (role, name) = match read_frame_within::<Message, _>(stream, HANDSHAKE_FRAME_LIMIT).await? {
        Message::Hello { magic, version, role, name } => {
            if magic != MAGIC {
                return Err(HandshakeError::Protocol("bad magic".into()));
            }
            if version != PROTOCOL_VERSION {
                let reason =
                    format!("protocol version {version} not supported (this node speaks {PROTOCOL_VERSION})");
                let _ = write_frame(stream, &Message::Refused { reason: reason.clone() }).await;
                let _ = stream.flush().await;
                return Err(HandshakeError::Refused(reason));
            }
            if let Err(reason) = check_peer_name(&name) {
                let _ = write_frame(stream, &Message::Refused { reason: reason.clone() }).await;
                let _ = stream.flush().await;
                return Err(HandshakeError::Refused(reason));
            }
            (role, name)
        }
        other => return Err(HandshakeError::Protocol(format!("expected hello, got {other:?}"))),
    };
    let nonce = random_nonce();
    write_frame(stream, &Message::Challenge { nonce }).await?;
    stream.flush().await.map_err(FrameError::from)?;
    match read_frame_within::<Message, _>(stream, HANDSHAKE_FRAME_LIMIT).await? {
        Message::Proof { client_nonce, mac } => {
            if key.mac(b"client", &nonce, &client_nonce) != blake3::Hash::from(mac) {
                let reason = "wrong cluster secret".to_string();
                let _ = write_frame(stream, &Message::Refused { reason: reason.clone() }).await;
                let _ = stream.flush().await;
                return Err(HandshakeError::Refused(format!("{reason} from `{name}`")));
            }
            let mac = *key.mac(b"server", &client_nonce, &nonce).as_bytes();
            write_frame(stream, &Message::Welcome { mac }).await?;
            stream.flush().await.map_err(FrameError::from)?;
            Ok((role, name))
        }
        other => Err(HandshakeError::Protocol(format!("expected a proof, got {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{duplex, AsyncReadExt};

    use super::*;
    use crate::net::frame::encode_frame;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
    }

    /// A peer announcing a first frame of 16 MiB is refused on reading the length, before
    /// any of it is read or a buffer for it is made.
    #[test]
    fn a_large_first_frame_is_refused_before_it_is_read() {
        runtime().block_on(async {
            let (mut server, mut peer) = duplex(64);
            peer.write_all(&(16u32 << 20).to_le_bytes()).await.unwrap();
            let key = ClusterKey::from_secret("s");
            let refused =
                tokio::time::timeout(Duration::from_secs(5), server_handshake(&mut server, &key)).await;
            match refused {
                Ok(Err(HandshakeError::Frame(FrameError::Oversized { len, limit }))) => {
                    assert_eq!((len, limit), (16 << 20, HANDSHAKE_FRAME_LIMIT));
                }
                other => panic!("expected an oversized frame, got {other:?}"),
            }
        });
    }

    /// A name with a line break (which would forge log lines) or too long is refused, and
    /// the peer is told why.
    #[test]
    fn names_with_control_characters_or_too_long_are_refused() {
        for name in [
            "node\nINFO joined the cluster name=forged".to_string(),
            "x".repeat(MAX_PEER_NAME + 1),
            String::new(),
        ] {
            runtime().block_on(async {
                let (mut server, mut peer) = duplex(4096);
                let hello =
                    Message::Hello { magic: MAGIC, version: PROTOCOL_VERSION, role: Role::Node, name };
                peer.write_all(&encode_frame(&hello).unwrap()).await.unwrap();
                let key = ClusterKey::from_secret("s");
                match server_handshake(&mut server, &key).await {
                    Err(HandshakeError::Refused(reason)) => {
                        assert!(reason.contains("control characters"), "{reason}")
                    }
                    other => panic!("expected a refusal, got {other:?}"),
                }
                match read_frame_within::<Message, _>(&mut peer, HANDSHAKE_FRAME_LIMIT).await.unwrap() {
                    Message::Refused { reason } => assert!(reason.contains("255 bytes"), "{reason}"),
                    other => panic!("expected Refused, got {other:?}"),
                }
            });
        }
        assert!(check_peer_name("local-1").is_ok() && check_peer_name(&"é".repeat(127)).is_ok());
    }

    /// A server that never answers: the client gives up after its timeout.
    #[test]
    fn a_silent_server_times_the_client_out() {
        runtime().block_on(async {
            let (mut client, mut server) = duplex(4096);
            let key = ClusterKey::from_secret("s");
            let timeout = Duration::from_millis(200);
            let result = client_handshake_within(&mut client, &key, Role::Node, "n", timeout).await;
            assert!(matches!(result, Err(HandshakeError::TimedOut(t)) if t == timeout), "{result:?}");
            // (The hello did go out.)
            let mut first = [0u8; 4];
            server.read_exact(&mut first).await.unwrap();
        });
    }
}
