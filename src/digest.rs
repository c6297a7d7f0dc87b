//! Digests of text, where a value must be recognisable without being kept: forgotten
//! identifiers, hashed exports, the trait files a profile table was computed with.

use sha2::{Digest, Sha256};

/// SHA-256 of `text` as lowercase hex.
pub fn sha256_hex(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}
