//! Wire frames: a 4-byte little-endian length, then a bincode-encoded message.
//!
//! A frame longer than [`MAX_FRAME_LEN`] or one that does not decode is an error for that
//! connection only: the reader returns it and the connection is closed.
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The largest frame a node accepts (16 MiB). Bigger objects stream raw after a header.
pub const MAX_FRAME_LEN: usize = 16 << 20;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The peer announced a frame larger than the limit.
    #[error("frame of {len} bytes exceeds the {limit}-byte limit")]
    Oversized {
        /// The announced length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The frame's bytes are not a valid message.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The connection failed or closed.
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes one frame (length prefix included).
pub(crate) fn encode_frame<M: Serialize>(message: &M) -> Result<Vec<u8>, FrameError> {
    let mut buf = vec![0u8; 4];
    bincode::serde::encode_into_std_write(message, &mut buf, bincode::config::standard())
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    let len = buf.len() - 4;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::Oversized { len, limit: MAX_FRAME_LEN });
    }
    buf[..4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(buf)
}

/// Decodes one frame's payload (without its length prefix). Never panics on bad input.
pub fn decode_frame<M: DeserializeOwned>(payload: &[u8]) -> Result<M, FrameError> {
    let config = bincode::config::standard().with_limit::<MAX_FRAME_LEN>();
    match bincode::serde::decode_from_slice(payload, config) {
        Ok((message, used)) if used == payload.len() => Ok(message),
        Ok((_, used)) => Err(FrameError::Malformed(format!("{} trailing bytes", payload.len() - used))),
        Err(e) => Err(FrameError::Malformed(e.to_string())),
    }
}

/// Reads one frame.
pub(crate) async fn read_frame<M: DeserializeOwned, R: AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<M, FrameError> {
    read_frame_within(reader, MAX_FRAME_LEN).await
}

/// Reads one frame of at most `limit` bytes (a peer not authenticated yet gets a small
/// one, so that it cannot make this process hold a large buffer).
pub(crate) async fn read_frame_within<M: DeserializeOwned, R: AsyncRead + Unpin>(
    reader: &mut R,
    limit: usize,
) -> Result<M, FrameError> {
    let mut len = [0u8; 4];
    reader.read_exact(&mut len).await?;
    let len = u32::from_le_bytes(len) as usize;
    if len > limit.min(MAX_FRAME_LEN) {
        return Err(FrameError::Oversized { len, limit: limit.min(MAX_FRAME_LEN) });
    }
    let mut payload = vec![0u8; len];
    reader.read_exact(&mut payload).await?;
    decode_frame(&payload)
}

/// Writes one frame (not flushed).
pub(crate) async fn write_frame<M: Serialize, W: AsyncWrite + Unpin>(
    writer: &mut W,
    message: &M,
) -> Result<(), FrameError> {
    let frame = encode_frame(message)?;
    writer.write_all(&frame).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::wire::Message;

    #[test]
    fn frames_round_trip() {
        let message = Message::Free(vec![1, 2, 3]);
        let frame = encode_frame(&message).expect("encodes");
        let len = u32::from_le_bytes(frame[..4].try_into().expect("4 bytes")) as usize;
        assert_eq!(len, frame.len() - 4);
        let back: Message = decode_frame(&frame[4..]).expect("decodes");
        assert!(matches!(back, Message::Free(ids) if ids == vec![1, 2, 3]));
    }

    #[test]
    fn oversized_frames_are_refused_before_reading() {
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        let mut bytes: &[u8] = &(u32::MAX).to_le_bytes();
        let result = rt.block_on(read_frame::<Message, _>(&mut bytes));
        assert!(matches!(result, Err(FrameError::Oversized { .. })), "{result:?}");
    }

    proptest::proptest! {
        #[test]
        fn random_bytes_never_panic_the_decoder(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..2048)) {
            let _ = decode_frame::<Message>(&bytes);
        }

        #[test]
        fn random_streams_never_panic_the_reader(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..4096)) {
            let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
            let mut reader: &[u8] = &bytes;
            rt.block_on(async {
                while read_frame::<Message, _>(&mut reader).await.is_ok() {}
            });
        }

        #[test]
        fn truncated_valid_frames_are_errors(cut in 0usize..64) {
            let message = Message::Hello {
                magic: crate::net::wire::MAGIC,
                version: crate::net::wire::PROTOCOL_VERSION,
                role: crate::net::wire::Role::Data,
                name: "node-with-a-name".into(),
            };
            let frame = encode_frame(&message).expect("encodes");
            let payload = &frame[4..];
            let cut = cut.min(payload.len().saturating_sub(1));
            proptest::prop_assert!(decode_frame::<Message>(&payload[..cut]).is_err());
        }
    }
}
