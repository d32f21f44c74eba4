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
        if let Some((channel, &value)) = v.iter().enumerate().find(|(_, x)| !x.is_finite()) {
            return Err(Error::NonFiniteStatistic { arg, channel, value });
        }
    }
    Ok(())
}

/// A variance: finite and >= 0.
pub(crate) fn variance(arg: &'static str, v: Option<&[f32]>) -> Result<()> {
    finite(arg, v)?;
    if let Some(v) = v {
        if let Some((channel, &value)) = v.iter().enumerate().find(|(_, x)| **x < 0.0) {
            return Err(Error::NegativeVariance { arg, channel, value });
        }
    }
    Ok(())
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
