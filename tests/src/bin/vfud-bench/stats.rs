//! Latency samples and the figures reported from them.

use std::time::Duration;

/// Per-operation latencies in nanoseconds.
#[derive(Debug, Default)]
pub struct Samples(Vec<u64>);

impl Samples {
    pub fn with_capacity(n: usize) -> Samples {
        Samples(Vec::with_capacity(n))
    }

    pub fn push(&mut self, d: Duration) {
        self.0.push(d.as_nanos() as u64);
    }

    pub fn extend(&mut self, other: Samples) {
        self.0.extend(other.0);
    }

    fn percentile(&self, p: f64) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        let mut v = self.0.clone();
        v.sort_unstable();
        let idx = ((v.len() - 1) as f64 * p).round() as usize;
        v[idx] as f64
    }

    /// Median in nanoseconds.
    pub fn median(&self) -> f64 {
        self.percentile(0.5)
    }

    /// 99th percentile in nanoseconds.
    pub fn p99(&self) -> f64 {
        self.percentile(0.99)
    }
}
