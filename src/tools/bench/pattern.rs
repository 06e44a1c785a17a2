//! The bytes a benchmark sends, chosen so every echoed byte can be checked cheaply.
//!
//! Each connection's stream is a window on one fixed pseudo-random cycle whose length
//! is prime, starting at a different phase per connection: a byte that is flipped,
//! lost, duplicated, reordered or crossed over from another connection no longer
//! matches, and checking is a `memcmp` against a slice, so verification costs far less
//! than the echo it verifies.

/// Cycle length: prime, so chunk sizes that are powers of two never realign with it.
const CYCLE: usize = 65_521;

/// The shared cycle, extended so any window of up to `max_len` bytes is contiguous.
#[derive(Debug)]
pub(crate) struct Pattern {
    bytes: Vec<u8>,
}

impl Pattern {
    /// A pattern whose windows can be up to `max_len` bytes long.
    pub(crate) fn new(max_len: usize) -> Self {
        let mut rng = fastrand::Rng::with_seed(0x6563_686f_6421);
        let cycle: Vec<u8> = std::iter::repeat_with(|| rng.u8(..)).take(CYCLE).collect();
        let bytes = cycle
            .iter()
            .copied()
            .cycle()
            .take(CYCLE + max_len.max(1))
            .collect();
        Self { bytes }
    }

    /// The starting phase of connection `id`'s stream.
    pub(crate) fn phase(id: usize) -> u64 {
        (id as u64).wrapping_mul(7_919) % CYCLE as u64
    }

    /// `len` bytes of the stream that starts at `phase`, from stream offset `offset`.
    pub(crate) fn window(&self, phase: u64, offset: u64, len: usize) -> &[u8] {
        let start = ((phase + offset) % CYCLE as u64) as usize;
        &self.bytes[start..start + len]
    }

    /// The index of the first byte of `got` that differs from the stream at `offset`.
    pub(crate) fn first_difference(&self, phase: u64, offset: u64, got: &[u8]) -> Option<usize> {
        let mut checked = 0;
        // Check in pieces no longer than the extension, so each window is contiguous.
        while checked < got.len() {
            let n = (got.len() - checked).min(self.bytes.len() - CYCLE);
            let expected = self.window(phase, offset + checked as u64, n);
            let piece = &got[checked..checked + n];
            if expected != piece {
                return expected
                    .iter()
                    .zip(piece)
                    .position(|(a, b)| a != b)
                    .map(|i| checked + i);
            }
            checked += n;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_continue_the_stream_across_the_cycle() {
        let p = Pattern::new(100);
        let phase = Pattern::phase(3);
        let whole: Vec<u8> = (0..3 * CYCLE as u64)
            .step_by(100)
            .flat_map(|o| p.window(phase, o, 100).to_vec())
            .collect();
        assert_eq!(p.first_difference(phase, 0, &whole), None);
        let mut bad = whole.clone();
        bad[CYCLE + 5] ^= 0x40;
        assert_eq!(p.first_difference(phase, 0, &bad), Some(CYCLE + 5));
    }

    #[test]
    fn streams_of_different_connections_differ() {
        let p = Pattern::new(64);
        let a = p.window(Pattern::phase(0), 0, 64).to_vec();
        assert!(p.first_difference(Pattern::phase(1), 0, &a).is_some());
    }
}
