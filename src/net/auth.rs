//! The handshake: version check and mutual challenge-response over the cluster secret.
//!
//! The secret never crosses the wire. Both sides derive a key from it; the server sends a
//! random nonce, the client answers with a keyed BLAKE3 MAC over both nonces, and the server
//! proves itself the same way. A wrong version or proof is refused, logged, and the
//! connection closed.
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::frame::{read_frame, write_frame, FrameError};
use super::wire::{Message, Role, MAGIC, PROTOCOL_VERSION};

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

/// Client side: proves knowledge of the secret and checks the server's proof.
pub(crate) async fn client_handshake<S: AsyncRead + AsyncWrite + Unpin>(
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
    let nonce = match read_frame::<Message, _>(stream).await? {
        Message::Challenge { nonce } => nonce,
        Message::Refused { reason } => return Err(HandshakeError::Refused(reason)),
        other => return Err(HandshakeError::Protocol(format!("expected a challenge, got {other:?}"))),
    };
    let client_nonce = random_nonce();
    let mac = *key.mac(b"client", &nonce, &client_nonce).as_bytes();
    write_frame(stream, &Message::Proof { client_nonce, mac }).await?;
    stream.flush().await.map_err(FrameError::from)?;
    match read_frame::<Message, _>(stream).await? {
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
    let (role, name) = match read_frame::<Message, _>(stream).await? {
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
            (role, name)
        }
        other => return Err(HandshakeError::Protocol(format!("expected hello, got {other:?}"))),
    };
    let nonce = random_nonce();
    write_frame(stream, &Message::Challenge { nonce }).await?;
    stream.flush().await.map_err(FrameError::from)?;
    match read_frame::<Message, _>(stream).await? {
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
