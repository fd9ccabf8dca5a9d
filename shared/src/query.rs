//! Validation of search requests, shared by the edge, the cloud and the WASM guest.
//!
//! Every request path calls [`validate_search`] before touching an index, so a wrong dimension,
//! a NaN or an absurd `k` is a typed error with a message the caller can act on, never a panic
//! deep inside a kernel.

use thiserror::Error;

/// Characters (Unicode scalar values) one query or document text may have where a text stands
/// in for a vector: the embedding model reads 256 tokens at most (rarely more than ~2,000
/// characters), so this only bounds what a client can make the tokenizer read. Counted in
/// characters, as JSON Schema's `maxLength` counts, so the API document states it exactly.
pub const MAX_TEXT_CHARS: usize = 4_096;

/// The largest `k` a search accepts. Answers are meant for an LLM's context window; a larger
/// `k` is almost always a bug in the caller, and it bounds the work and memory of one request.
pub const MAX_K: usize = 1024;

/// The largest `ef` (beam width) a search accepts; larger values buy no recall on any index
/// tiervec builds and only cost time.
pub const MAX_EF: usize = 4096;

/// The largest magnitude of a component of a vector stored or searched. Below it no distance
/// overflows: a dot product or squared difference of two such vectors of up to
/// `snapshot::MAX_DIM` components stays under `f32::MAX` (1e15² · 65,536 ≈ 6.6e34); above it
/// `dot` and `l2` distances can become infinite and then NaN.
pub const MAX_COMPONENT: f32 = 1e15;

/// Why a search request was refused.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum QueryError {
    #[error("query has {found} dimensions but the index has {expected}")]
    DimensionMismatch { expected: usize, found: usize },
    #[error(
        "query component {index} is {value}: every component must be a finite number (no NaN or infinity)"
    )]
    NonFinite { index: usize, value: f32 },
    #[error(
        "component {index} is {value}: magnitudes above {MAX_COMPONENT:e} overflow distances; scale the vectors down"
    )]
    TooLarge { index: usize, value: f32 },
    #[error("k must be at least 1")]
    ZeroK,
    #[error("k = {k} is above the maximum of {max}")]
    KTooLarge { k: usize, max: usize },
    #[error("ef = {ef} is above the maximum of {max}")]
    EfTooLarge { ef: usize, max: usize },
    #[error("an index holds at most {max} vectors")]
    TooManyVectors { max: usize },
}

/// Checks that a vector to be stored or searched has `dim` finite components, none larger in
/// magnitude than [`MAX_COMPONENT`].
pub fn validate_vector(vector: &[f32], dim: usize) -> Result<(), QueryError> {
    if vector.len() != dim {
        return Err(QueryError::DimensionMismatch {
            expected: dim,
            found: vector.len(),
        });
    }
    match vector
        .iter()
        .enumerate()
        .find(|(_, x)| !x.is_finite() || x.abs() > MAX_COMPONENT)
    {
        Some((index, &value)) if !value.is_finite() => Err(QueryError::NonFinite { index, value }),
        Some((index, &value)) => Err(QueryError::TooLarge { index, value }),
        None => Ok(()),
    }
}

/// Checks a query vector and its `k` and `ef` against an index of dimension `dim`.
pub fn validate_search(query: &[f32], dim: usize, k: usize, ef: usize) -> Result<(), QueryError> {
    validate_vector(query, dim)?;
    if k == 0 {
        return Err(QueryError::ZeroK);
    }
    if k > MAX_K {
        return Err(QueryError::KTooLarge { k, max: MAX_K });
    }
    if ef > MAX_EF {
        return Err(QueryError::EfTooLarge { ef, max: MAX_EF });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_bad_request_has_its_own_error() {
        let q = [0.5f32; 4];
        assert_eq!(validate_search(&q, 4, 10, 64), Ok(()));
        assert_eq!(
            validate_search(&q, 3, 10, 64),
            Err(QueryError::DimensionMismatch {
                expected: 3,
                found: 4
            })
        );
        let nan = [0.0, f32::NAN, 0.0, 0.0];
        assert!(matches!(
            validate_search(&nan, 4, 10, 64),
            Err(QueryError::NonFinite { index: 1, .. })
        ));
        let inf = [0.0, 0.0, f32::NEG_INFINITY, 0.0];
        assert!(matches!(
            validate_search(&inf, 4, 10, 64),
            Err(QueryError::NonFinite { index: 2, .. })
        ));
        let at_limit = [0.0, -MAX_COMPONENT, 0.0, MAX_COMPONENT];
        assert_eq!(validate_search(&at_limit, 4, 10, 64), Ok(()));
        let above = [0.0, 0.0, 0.0, MAX_COMPONENT.next_up()];
        assert!(matches!(
            validate_search(&above, 4, 10, 64),
            Err(QueryError::TooLarge { index: 3, .. })
        ));
        assert_eq!(validate_search(&q, 4, 0, 64), Err(QueryError::ZeroK));
        assert_eq!(
            validate_search(&q, 4, MAX_K + 1, 64),
            Err(QueryError::KTooLarge {
                k: MAX_K + 1,
                max: MAX_K
            })
        );
        assert_eq!(validate_search(&q, 4, MAX_K, MAX_EF), Ok(()));
        assert!(matches!(
            validate_search(&q, 4, 1, MAX_EF + 1),
            Err(QueryError::EfTooLarge { .. })
        ));
    }
}
