//! Identities: which incarnation of a named collection a snapshot or answer belongs to, and
//! which embedding model a collection's vectors were made with.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A 128-bit identity (a UUID's bytes) given to a collection when it is created. A collection
/// dropped and recreated under the same name gets a new one, so an edge never mixes vectors
/// from the old incarnation with answers from the new.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct CollectionId(pub [u8; 16]);

impl CollectionId {
    pub const fn from_u128(value: u128) -> Self {
        CollectionId(value.to_be_bytes())
    }

    pub const fn as_u128(&self) -> u128 {
        u128::from_be_bytes(self.0)
    }
}

impl fmt::Display for CollectionId {
    /// The canonical 8-4-4-4-12 hexadecimal UUID form.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.as_u128();
        write!(
            f,
            "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            (v >> 96) as u32,
            (v >> 80) as u16,
            (v >> 64) as u16,
            (v >> 48) as u16,
            v & 0xffff_ffff_ffff
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_as_a_uuid() {
        let id = CollectionId::from_u128(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
        assert_eq!(id.to_string(), "01234567-89ab-cdef-0011-223344556677");
    }
}

/// The embedding model a collection's vectors were made with: text queries are embedded only
/// by the same model (`tiervec-embed` computes it from the model's files).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ModelIdentity {
    /// The model folder's name, e.g. `all-MiniLM-L6-v2`.
    pub name: String,
    /// Dimension of its embeddings.
    pub dim: u32,
    /// xxh3-64 of its weights file followed by its `tokenizer.json`.
    pub checksum: u64,
}

impl fmt::Display for ModelIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}-d, {:016x})", self.name, self.dim, self.checksum)
    }
}
