//! Parsing of the TEXMEX `.fvecs` / `.ivecs` layout from bytes: each row is a little-endian
//! `i32` dimension followed by that many little-endian `f32` (fvecs) or `i32` (ivecs) values,
//! with no header and no padding. File IO lives in the callers (the testbed).

use thiserror::Error;

/// Largest dimension a row may declare; guards allocation against a corrupt length.
pub const MAX_ROW_DIM: usize = 1 << 16;

/// Why a vecs buffer could not be parsed. Offsets are byte offsets into the buffer.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum VecsError {
    #[error("row {row} at byte {offset} declares dimension {dim}, outside 1..={MAX_ROW_DIM}")]
    BadDimension { row: usize, offset: usize, dim: i64 },
    #[error("row {row} at byte {offset} has dimension {found}, but earlier rows have {expected}")]
    DimensionChanged {
        row: usize,
        offset: usize,
        expected: usize,
        found: usize,
    },
    #[error(
        "truncated: row {row} at byte {offset} needs {needed} bytes but only {available} remain"
    )]
    Truncated {
        row: usize,
        offset: usize,
        needed: usize,
        available: usize,
    },
}

/// A parsed matrix: `rows × dim` values, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Matrix<T> {
    pub dim: usize,
    pub data: Vec<T>,
}

impl<T> Matrix<T> {
    pub fn rows(&self) -> usize {
        self.data.len().checked_div(self.dim).unwrap_or(0)
    }

    pub fn row(&self, i: usize) -> &[T] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }
}

fn parse<T>(bytes: &[u8], decode: impl Fn([u8; 4]) -> T) -> Result<Matrix<T>, VecsError> {
    let mut offset = 0;
    let mut dim = 0usize;
    let mut data = Vec::new();
    let mut row = 0;
    while offset < bytes.len() {
        let available = bytes.len() - offset;
        if available < 4 {
            return Err(VecsError::Truncated {
                row,
                offset,
                needed: 4,
                available,
            });
        }
        let declared = i32::from_le_bytes(bytes[offset..offset + 4].try_into().expect("4 bytes"));
        if declared <= 0 || declared as usize > MAX_ROW_DIM {
            return Err(VecsError::BadDimension {
                row,
                offset,
                dim: declared.into(),
            });
        }
        let found = declared as usize;
        if row == 0 {
            dim = found;
            data.reserve(bytes.len() / (4 + 4 * dim) * dim);
        } else if found != dim {
            return Err(VecsError::DimensionChanged {
                row,
                offset,
                expected: dim,
                found,
            });
        }
        let needed = 4 + 4 * dim;
        if available < needed {
            return Err(VecsError::Truncated {
                row,
                offset,
                needed,
                available,
            });
        }
        data.extend(
            bytes[offset + 4..offset + needed]
                .chunks_exact(4)
                .map(|c| decode(c.try_into().expect("4 bytes"))),
        );
        offset += needed;
        row += 1;
    }
    Ok(Matrix { dim, data })
}

/// Parses an `.fvecs` buffer. An empty buffer is an empty matrix of dimension 0.
pub fn parse_fvecs(bytes: &[u8]) -> Result<Matrix<f32>, VecsError> {
    parse(bytes, f32::from_le_bytes)
}

/// Parses an `.ivecs` buffer. An empty buffer is an empty matrix of dimension 0.
pub fn parse_ivecs(bytes: &[u8]) -> Result<Matrix<i32>, VecsError> {
    parse(bytes, i32::from_le_bytes)
}

/// Encodes rows in the `.fvecs` layout (for tests and tools).
pub fn encode_fvecs(dim: usize, data: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() / dim.max(1) * (4 + 4 * dim));
    for row in data.chunks_exact(dim) {
        out.extend_from_slice(&(dim as i32).to_le_bytes());
        row.iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_reports_each_defect() {
        let bytes = encode_fvecs(3, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let m = parse_fvecs(&bytes).unwrap();
        assert_eq!((m.rows(), m.dim), (2, 3));
        assert_eq!(m.row(1), &[4.0, 5.0, 6.0]);
        assert_eq!(parse_fvecs(&[]).unwrap().rows(), 0);

        assert!(matches!(
            parse_fvecs(&bytes[..bytes.len() - 1]),
            Err(VecsError::Truncated { row: 1, .. })
        ));
        assert!(matches!(
            parse_fvecs(&bytes[..2]),
            Err(VecsError::Truncated {
                row: 0,
                needed: 4,
                ..
            })
        ));
        let mut changed = bytes.clone();
        changed[16..20].copy_from_slice(&2i32.to_le_bytes());
        assert!(matches!(
            parse_fvecs(&changed),
            Err(VecsError::DimensionChanged {
                row: 1,
                expected: 3,
                found: 2,
                ..
            })
        ));
        let mut negative = bytes;
        negative[0..4].copy_from_slice(&(-1i32).to_le_bytes());
        assert!(matches!(
            parse_fvecs(&negative),
            Err(VecsError::BadDimension { dim: -1, .. })
        ));
    }
}
