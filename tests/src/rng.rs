//! One small deterministic random source for every randomized test (the
//! differential test, the churn test, the data path model): xorshift64*,
//! no dependency, the same sequence for the same seed on every machine.
pub struct Rng(u64);

impl Rng {
    /// A generator started at `state` as given (not zero).
    pub fn new(state: u64) -> Self {
        Self(state | 1)
    }

    /// A generator for a small seed (0, 1, 2, ...): the seed is spread over
    /// the bits first, so neighbouring seeds start far apart.
    pub fn seeded(seed: u64) -> Self {
        Self::new(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// In `0..n` (0 for `n` 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// In `0..n` (0 for `n` 0).
    pub fn below_u64(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True `percent` times in a hundred.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }

    pub fn pick<T: Clone>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())].clone()
    }
}
