//! Mean and variance accumulators: Welford's update and Chan's pairwise merge.
//!
//! The backends accumulate in f32 inside cache-sized chunks (see `cpu::kernels`) and hand
//! each chunk's `(count, mean, m2)` to a [`Moments`], which merges in f64 with Chan's
//! formula. Nothing here ever forms `E[x^2] - E[x]^2`.

/// Count, mean and sum of squared deviations (`m2`) of a set of values.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Moments {
    pub count: f64,
    pub mean: f64,
    pub m2: f64,
}

impl Moments {
    /// Moments of the values in `xs` (two-pass, f64).
    ///
    /// ```
    /// use bnorm::stats::Moments;
    /// let m = Moments::of(&[1.0, 2.0, 3.0, 4.0]);
    /// assert_eq!((m.count, m.mean, m.var_biased()), (4.0, 2.5, 1.25));
    /// ```
    pub fn of(xs: &[f64]) -> Moments {
        let count = xs.len() as f64;
        if xs.is_empty() {
            return Moments::default();
        }
        let mean = xs.iter().sum::<f64>() / count;
        let m2 = xs.iter().map(|v| (v - mean) * (v - mean)).sum();
        Moments { count, mean, m2 }
    }

    /// Welford's update with one value.
    #[inline]
    pub fn push(&mut self, v: f64) {
        self.count += 1.0;
        let d = v - self.mean;
        self.mean += d / self.count;
        self.m2 += d * (v - self.mean);
    }

    /// Chan's merge of two disjoint sets.
    ///
    /// ```
    /// use bnorm::stats::Moments;
    /// let mut a = Moments::of(&[1.0, 2.0]);
    /// a.merge(&Moments::of(&[3.0, 4.0]));
    /// assert_eq!(a, Moments::of(&[1.0, 2.0, 3.0, 4.0]));
    /// ```
    #[inline]
    pub fn merge(&mut self, o: &Moments) {
        if o.count == 0.0 {
            return;
        }
        if self.count == 0.0 {
            *self = *o;
            return;
        }
        let n = self.count + o.count;
        let d = o.mean - self.mean;
        self.mean += d * (o.count / n);
        self.m2 += o.m2 + d * d * (self.count * o.count / n);
        self.count = n;
    }

    /// Biased variance `m2 / count` (what normalization uses).
    pub fn var_biased(&self) -> f64 {
        if self.count > 0.0 {
            (self.m2 / self.count).max(0.0)
        } else {
            0.0
        }
    }

    /// Unbiased variance `m2 / (count - 1)` (what PyTorch's running_var takes).
    pub fn var_unbiased(&self) -> f64 {
        if self.count > 1.0 {
            (self.m2 / (self.count - 1.0)).max(0.0)
        } else {
            0.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn welford_and_chan_agree_with_two_pass() {
        let xs: Vec<f64> = (0..1000).map(|i| 1e6 + ((i * 37 % 101) as f64) * 0.01).collect();
        let reference = Moments::of(&xs);
        let mut w = Moments::default();
        xs.iter().for_each(|&v| w.push(v));
        let mut c = Moments::of(&xs[..333]);
        c.merge(&Moments::of(&xs[333..]));
        for m in [w, c] {
            assert_eq!(m.count, 1000.0);
            assert!((m.mean - reference.mean).abs() < 1e-9);
            assert!((m.m2 - reference.m2).abs() / reference.m2 < 1e-9);
        }
    }
}
