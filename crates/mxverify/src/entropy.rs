//! Randomness for real verifications: the operating system's CSPRNG.

use mxverify_proto::Entropy;

/// [`Entropy`] from the operating system (`getrandom`).
#[derive(Debug, Default, Clone, Copy)]
pub struct OsEntropy;

impl Entropy for OsEntropy {
    fn fill(&mut self, buf: &mut [u8]) {
        // Without a working OS RNG no key may be made at all; stopping is the only safe answer.
        getrandom::fill(buf).expect("the operating system's random number generator failed");
    }
}
