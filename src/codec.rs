//! Decoding values from their bincode encoding (standard configuration) with the memory a
//! decoding may take bounded by the length of its input. Bytes from a peer, a file or a
//! blob store may be corrupt: a length prefix of 2^63 must be a decode error, not an
//! allocation that aborts the process. bincode allocates a byte string or a `String` for
//! its declared length before reading it; with a limit in its configuration it first
//! counts that length against the limit. Every decoded primitive counts too (its size in
//! memory, at most 16 bytes, for at least one byte of input), so a limit of 16 times the
//! input's length never refuses a well-formed encoding. The limit is a const parameter of
//! bincode's configuration, so it goes up in powers of four: an input can claim at most
//! 64 times its length (and at least 64 KiB).
use bincode::error::DecodeError;
use serde::de::DeserializeOwned;

/// The most memory one byte of input can legitimately make a decoder count: a `u128` (or
/// an `Option<u64>`) from a one-byte varint.
const CLAIM_PER_BYTE: usize = 16;

/// Runs `$body` with `$config` bound to bincode's standard configuration limited to at
/// least `CLAIM_PER_BYTE` × `$len` bytes (a power of four, at least 64 KiB).
macro_rules! with_limit_for {
    ($len:expr, |$config:ident| $body:expr) => {{
        let claim = ($len).saturating_mul(CLAIM_PER_BYTE).max(1 << 16);
        // The exponent of the power of four at or above `claim`.
        let exponent = (usize::BITS - (claim - 1).leading_zeros()).div_ceil(2) * 2;
        let standard = bincode::config::standard();
        match exponent {
            16 => {
                let $config = standard.with_limit::<{ 1 << 16 }>();
                $body
            }
            18 => {
                let $config = standard.with_limit::<{ 1 << 18 }>();
                $body
            }
            20 => {
                let $config = standard.with_limit::<{ 1 << 20 }>();
                $body
            }
            22 => {
                let $config = standard.with_limit::<{ 1 << 22 }>();
                $body
            }
            24 => {
                let $config = standard.with_limit::<{ 1 << 24 }>();
                $body
            }
            26 => {
                let $config = standard.with_limit::<{ 1 << 26 }>();
                $body
            }
            28 => {
                let $config = standard.with_limit::<{ 1 << 28 }>();
                $body
            }
            30 => {
                let $config = standard.with_limit::<{ 1 << 30 }>();
                $body
            }
            32 => {
                let $config = standard.with_limit::<{ 1 << 32 }>();
                $body
            }
            34 => {
                let $config = standard.with_limit::<{ 1 << 34 }>();
                $body
            }
            36 => {
                let $config = standard.with_limit::<{ 1 << 36 }>();
                $body
            }
            38 => {
                let $config = standard.with_limit::<{ 1 << 38 }>();
                $body
            }
            40 => {
                let $config = standard.with_limit::<{ 1 << 40 }>();
                $body
            }
            // Inputs of 64 GiB and more: no limit beyond the machine's.
            _ => {
                let $config = standard;
                $body
            }
        }
    }};
}

/// Decodes a `T` from the start of `bytes`; gives it and how many bytes it used.
pub(crate) fn decode_slice<T: DeserializeOwned>(bytes: &[u8]) -> Result<(T, usize), DecodeError> {
    with_limit_for!(bytes.len(), |config| bincode::serde::decode_from_slice(bytes, config))
        .map_err(|e| explained(e, bytes.len()))
}

/// Decodes a `T` from `reader`, which holds `len` bytes.
pub(crate) fn decode_read<T: DeserializeOwned>(
    reader: &mut impl std::io::Read,
    len: usize,
) -> Result<T, DecodeError> {
    with_limit_for!(len, |config| bincode::serde::decode_from_std_read(reader, config))
        .map_err(|e| explained(e, len))
}

/// Says what a refusal by the limit means.
fn explained(error: DecodeError, len: usize) -> DecodeError {
    match error {
        DecodeError::LimitExceeded => DecodeError::OtherString(format!(
            "a length in the encoding is larger than its {len} bytes can hold (corrupt data, or not this type)"
        )),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
        bincode::serde::encode_to_vec(value, bincode::config::standard()).unwrap()
    }

    /// A byte string or `String` whose length prefix says 2^63 - 1 (nothing behind it): an
    /// error, where bincode's unlimited decoder aborts the process allocating it.
    #[test]
    fn a_huge_length_prefix_is_an_error() {
        let poison = [0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f];
        assert!(matches!(decode_slice::<String>(&poison), Err(DecodeError::OtherString(_))));
        assert!(matches!(decode_slice::<serde_bytes::ByteBuf>(&poison), Err(DecodeError::OtherString(_))));
        let mut reader = &poison[..];
        assert!(matches!(decode_read::<String>(&mut reader, poison.len()), Err(DecodeError::OtherString(_))));
        // Within a larger value, after fields that decoded.
        let mut nested = encode(&(7u64, "ok".to_string()));
        nested.extend_from_slice(&poison);
        assert!(decode_slice::<(u64, String, String)>(&nested).is_err());
    }

    /// The encodings that count the most memory per byte of input decode, at every size
    /// class of the limit.
    #[test]
    fn well_formed_encodings_decode_at_every_size() {
        for len in [0usize, 1, 100, 5_000, 70_000, 300_000] {
            let wide = vec![0u128; len];
            assert_eq!(decode_slice::<Vec<u128>>(&encode(&wide)).unwrap().0, wide);
            let options = vec![None::<u64>; len];
            assert_eq!(decode_slice::<Vec<Option<u64>>>(&encode(&options)).unwrap().0, options);
            let text = "é".repeat(len);
            let bytes = encode(&text);
            assert_eq!(decode_slice::<String>(&bytes).unwrap(), (text.clone(), bytes.len()));
            assert_eq!(decode_read::<String>(&mut &bytes[..], bytes.len()).unwrap(), text);
        }
    }
}
