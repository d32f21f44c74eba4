//! Every check an op makes before it touches memory.

use crate::buffer::{Buf, BufMut, Location};
use crate::error::{Error, Result};

/// Length of a buffer against what the shape asks for.
pub(crate) fn len(arg: &'static str, actual: usize, expected: usize) -> Result<()> {
    if actual != expected {
        return Err(Error::LengthMismatch { arg, expected, actual });
    }
    Ok(())
}

/// A buffer must live where the op runs.
pub(crate) fn location(arg: &'static str, found: Location, expected: Location) -> Result<()> {
    if found != expected {
        return Err(Error::WrongDevice { arg, expected: expected.to_string(), found: found.to_string() });
    }
    Ok(())
}

/// Length and location of a read buffer.
pub(crate) fn input<T>(arg: &'static str, b: &Buf<'_, T>, expected: usize, at: Location) -> Result<()> {
    len(arg, b.len(), expected)?;
    location(arg, b.location(), at)
}

/// Length and location of a written buffer.
pub(crate) fn output<T>(arg: &'static str, b: &BufMut<'_, T>, expected: usize, at: Location) -> Result<()> {
    len(arg, b.len(), expected)?;
    location(arg, b.location(), at)
}

/// Optional variants of the two above.
pub(crate) fn opt_input<T>(arg: &'static str, b: Option<&Buf<'_, T>>, expected: usize, at: Location) -> Result<()> {
    b.map_or(Ok(()), |b| input(arg, b, expected, at))
}

pub(crate) fn opt_output<T>(arg: &'static str, b: Option<&BufMut<'_, T>>, expected: usize, at: Location) -> Result<()> {
    b.map_or(Ok(()), |b| output(arg, b, expected, at))
}

/// Every value finite (host memory only; device buffers are checked by the kernels' callers
/// where they can be, see the CUDA backend's notes).
pub(crate) fn finite(arg: &'static str, v: Option<&[f32]>) -> Result<()> {
    if let Some(v) = v {
        if all(v, f32::is_finite) {
            return Ok(());
        }
        if let Some((channel, &value)) = v.iter().enumerate().find(|(_, x)| !x.is_finite()) {
            return Err(Error::NonFiniteStatistic { arg, channel, value });
        }
    }
    Ok(())
}

/// A variance: finite and >= 0.
pub(crate) fn variance(arg: &'static str, v: Option<&[f32]>) -> Result<()> {
    if let Some(v) = v.filter(|v| !all(v, |x| (0.0..=f32::MAX).contains(&x))) {
        finite(arg, Some(v))?;
        if let Some((channel, &value)) = v.iter().enumerate().find(|(_, x)| **x < 0.0) {
            return Err(Error::NegativeVariance { arg, channel, value });
        }
    }
    Ok(())
}

/// Whether `ok` holds for every value: branch-free within blocks of 64 so that the
/// compiler vectorizes it (a search that stops at the first failure runs one value per
/// step; for 4096 channels the two statistics checks of an inference were a tenth of a
/// 16 KB op's time).
fn all(v: &[f32], ok: impl Fn(f32) -> bool) -> bool {
    v.chunks(64).all(|b| b.iter().fold(true, |all, &x| all & ok(x)))
}

#[cfg_attr(not(all(feature = "cuda", bnorm_kernels)), allow(dead_code))]
/// Two device buffers must not overlap (host buffers cannot: the borrow checker forbids a
/// `&[T]` and a `&mut [T]` over the same memory).
pub(crate) fn disjoint(a: &'static str, ra: Option<(u64, u64)>, b: &'static str, rb: Option<(u64, u64)>) -> Result<()> {
    if let (Some((a0, a1)), Some((b0, b1))) = (ra, rb) {
        if a0 < b1 && b0 < a1 {
            return Err(Error::Aliasing { a, b });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The block-wise checks find the first bad channel in any block, name it and its
    /// value, and pass -0.0, subnormals and `f32::MAX` as variances.
    #[test]
    fn statistics_checks_name_the_first_bad_channel_in_any_block() {
        let mut v = vec![1.0f32; 200];
        v[0] = -0.0;
        v[1] = f32::MIN_POSITIVE / 2.0;
        v[2] = f32::MAX;
        assert_eq!(variance("running_var", Some(&v)), Ok(()));
        for at in [63, 64, 130, 199] {
            let mut w = v.clone();
            w[at] = -0.5;
            w[at.max(1) - 1] = 0.25;
            let want = Error::NegativeVariance { arg: "running_var", channel: at, value: -0.5 };
            assert_eq!(variance("running_var", Some(&w)), Err(want));
            assert_eq!(finite("running_mean", Some(&w)), Ok(()));
            // a non-finite value is reported before a negative one, wherever they are
            w[at] = f32::INFINITY;
            w[199 - at / 2] = -2.0;
            let want = Error::NonFiniteStatistic { arg: "running_var", channel: at, value: f32::INFINITY };
            assert_eq!(variance("running_var", Some(&w)), Err(want));
        }
        let mut nan = vec![0.0f32; 100];
        nan[70] = f32::NAN;
        assert!(matches!(finite("saved_mean", Some(&nan)), Err(Error::NonFiniteStatistic { channel: 70, .. })));
        assert_eq!(finite("x", None), Ok(()));
    }
}
