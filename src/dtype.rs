//! Activation element types: `f32`, [`half::f16`] and [`half::bf16`].
//!
//! Everything per channel (weight, bias, running and saved statistics, gradients of the
//! parameters) is always `f32`; only the activations (x, y, z, dy, dx, dz) take one of
//! these types. Arithmetic always runs in f32.

use half::{bf16, f16};
use std::fmt;

/// The element types bnorm computes on, as a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    /// All element types, in a fixed order.
    pub const ALL: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Short lower-case name (`f32`, `f16`, `bf16`).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "float" => Ok(DType::F32),
            "f16" | "float16" | "half" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            _ => Err(format!("unknown dtype `{s}` (expected f32, f16 or bf16)")),
        }
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// An activation element type. Sealed: implemented for `f32`, `half::f16` and `half::bf16`.
///
/// ```
/// use bnorm::{DType, Element};
/// assert_eq!(<half::bf16 as Element>::DTYPE, DType::BF16);
/// assert_eq!(half::f16::from_f32_rounded(1.5).to_f32(), 1.5);
/// ```
pub trait Element: sealed::Sealed + Copy + Send + Sync + Default + PartialEq + fmt::Debug + 'static {
    /// This type as a value.
    const DTYPE: DType;
    /// Widen to f32 (exact for every element type).
    fn to_f32(self) -> f32;
    /// Round an f32 to this type, to nearest even.
    fn from_f32_rounded(v: f32) -> Self;
    /// Widen to f64 (exact).
    fn to_f64(self) -> f64 {
        self.to_f32() as f64
    }
    /// Round an f64 to this type, correctly rounded (one rounding, not two).
    fn from_f64_rounded(v: f64) -> Self;
    /// Distance to the next representable value above |v|'s magnitude class: the unit in
    /// the last place of `v` in this type (the spacing of subnormals for tiny values).
    fn ulp(v: f64) -> f64;
}

/// Round an f64 to f32 with round-to-odd: rounding that f32 once more to a format with at
/// most 22 significand bits (f16, bf16) then gives the correctly rounded result.
fn f64_to_f32_round_odd(v: f64) -> f32 {
    let t = v as f32;
    if !t.is_finite() || t as f64 == v {
        return t;
    }
    // truncate toward zero, then set the sticky last bit
    let mut bits = t.to_bits();
    if (t as f64).abs() > v.abs() {
        bits -= 1;
    }
    f32::from_bits(bits | 1)
}

/// Unit in the last place of a value in a binary format with `mantissa_bits` stored
/// fraction bits and minimum normal exponent `min_exp`.
fn ulp_of(v: f64, mantissa_bits: i32, min_exp: i32) -> f64 {
    let a = v.abs();
    let e = if a == 0.0 || !a.is_finite() { min_exp } else { (a.log2().floor() as i32).max(min_exp) };
    (2f64).powi(e - mantissa_bits)
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32_rounded(v: f32) -> Self {
        v
    }
    fn from_f64_rounded(v: f64) -> Self {
        v as f32
    }
    fn ulp(v: f64) -> f64 {
        ulp_of(v, 23, -126)
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32_rounded(v: f32) -> Self {
        f16::from_f32(v)
    }
    fn from_f64_rounded(v: f64) -> Self {
        f16::from_f32(f64_to_f32_round_odd(v))
    }
    fn ulp(v: f64) -> f64 {
        ulp_of(v, 10, -14)
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32_rounded(v: f32) -> Self {
        bf16::from_f32(v)
    }
    fn from_f64_rounded(v: f64) -> Self {
        bf16::from_f32(f64_to_f32_round_odd(v))
    }
    fn ulp(v: f64) -> f64 {
        ulp_of(v, 7, -126)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ulp_matches_next_representable() {
        for v in [1.0f64, 1.5, 1000.0, 3.0e-3] {
            let h = f16::from_f64(v);
            let next = f16::from_bits(h.to_bits() + 1).to_f64();
            assert_eq!(<f16 as Element>::ulp(h.to_f64()), next - h.to_f64());
            let b = bf16::from_f64(v);
            let next = bf16::from_bits(b.to_bits() + 1).to_f64();
            assert_eq!(<bf16 as Element>::ulp(b.to_f64()), next - b.to_f64());
            let f = v as f32;
            let next = f32::from_bits(f.to_bits() + 1) as f64;
            assert_eq!(<f32 as Element>::ulp(f as f64), next - f as f64);
        }
        // subnormal f16 spacing
        assert_eq!(<f16 as Element>::ulp(1e-7), 2f64.powi(-24));
    }

    #[test]
    fn f64_rounding_is_single() {
        // 1 + 2^-11 + 2^-40 is just above a tie in f16. Through f32 the 2^-40 is lost, the tie
        // goes to even and the result is 1.0; a single rounding gives 1 + 2^-10.
        let v = 1.0 + 2f64.powi(-11) + 2f64.powi(-40);
        assert_eq!(<f16 as Element>::from_f64_rounded(v).to_f64(), 1.0 + 2f64.powi(-10));
        assert_eq!(<f16 as Element>::from_f64_rounded(-v).to_f64(), -(1.0 + 2f64.powi(-10)));
        let w = 1.0 + 2f64.powi(-8) + 2f64.powi(-40);
        assert_eq!(<bf16 as Element>::from_f64_rounded(w).to_f64(), 1.0 + 2f64.powi(-7));
        // exact ties still go to even, and below-tie values round down
        assert_eq!(<f16 as Element>::from_f64_rounded(1.0 + 2f64.powi(-11)).to_f64(), 1.0);
        assert_eq!(<f16 as Element>::from_f64_rounded(1.0 + 2f64.powi(-11) - 2f64.powi(-40)).to_f64(), 1.0);
    }
}
