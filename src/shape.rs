//! Tensor shapes and memory layouts.
//!
//! A [`Shape`] is built from the dims **in memory order**, the way the buffer is laid out:
//! `Shape::channels_first(&[n, c, h, w])` for NCHW, `Shape::channels_last(&[n, h, w, c])`
//! for NHWC. Batch norm reduces, per channel, over `M = N * prod(spatial)` values.

use crate::error::{Error, Result};
use std::fmt;

/// Where the channel dimension sits in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    /// `(N, C, *spatial)`: NC, NCL, NCHW, NCDHW. PyTorch's default `contiguous_format`.
    ChannelsFirst,
    /// `(N, *spatial, C)`: NLC, NHWC, NDHWC. PyTorch's `channels_last(_3d)`.
    ChannelsLast,
}

impl Layout {
    /// Short name: `cf` or `cl`.
    pub fn short(self) -> &'static str {
        match self {
            Layout::ChannelsFirst => "cf",
            Layout::ChannelsLast => "cl",
        }
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Layout::ChannelsFirst => "channels-first",
            Layout::ChannelsLast => "channels-last",
        })
    }
}

impl std::str::FromStr for Layout {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "cf" | "channels-first" | "channels_first" | "nchw" | "ncl" | "ncdhw" | "nc" => Ok(Layout::ChannelsFirst),
            "cl" | "channels-last" | "channels_last" | "nhwc" | "nlc" | "ndhwc" => Ok(Layout::ChannelsLast),
            _ => Err(format!("unknown layout `{s}` (expected cf or cl)")),
        }
    }
}

/// A validated activation shape: dims in memory order plus the layout.
///
/// ```
/// use bnorm::{Layout, Shape};
/// let s = Shape::channels_last(&[8, 28, 28, 64]).unwrap();
/// assert_eq!((s.n(), s.c(), s.spatial(), s.m()), (8, 64, 784, 8 * 784));
/// assert_eq!(s.logical_dims(), vec![8, 64, 28, 28]);
/// assert_eq!(s.layout(), Layout::ChannelsLast);
/// assert!(Shape::channels_first(&[4, 0, 3]).is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Shape {
    dims: Vec<usize>,
    layout: Layout,
    n: usize,
    c: usize,
    spatial: usize,
}

impl Shape {
    /// Dims in memory order for `layout`: `(N, C, *spatial)` or `(N, *spatial, C)`.
    pub fn new(dims: &[usize], layout: Layout) -> Result<Shape> {
        if !(2..=5).contains(&dims.len()) {
            return Err(Error::InvalidRank { dims: dims.to_vec() });
        }
        let (n, c, sp): (usize, usize, &[usize]) = match layout {
            Layout::ChannelsFirst => (dims[0], dims[1], &dims[2..]),
            Layout::ChannelsLast => (dims[0], dims[dims.len() - 1], &dims[1..dims.len() - 1]),
        };
        if c == 0 {
            return Err(Error::ZeroChannels { dims: dims.to_vec() });
        }
        let overflow = || Error::ShapeOverflow { dims: dims.to_vec() };
        let spatial = sp.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(overflow)?;
        let numel = n.checked_mul(spatial).and_then(|m| m.checked_mul(c)).ok_or_else(overflow)?;
        // Byte counts of the widest element (f32) must fit too.
        numel.checked_mul(4).ok_or_else(overflow)?;
        if n == 0 || spatial == 0 {
            return Err(Error::EmptyReduction { dims: dims.to_vec() });
        }
        Ok(Shape { dims: dims.to_vec(), layout, n, c, spatial })
    }

    /// `(N, C, *spatial)` in memory order.
    pub fn channels_first(dims: &[usize]) -> Result<Shape> {
        Shape::new(dims, Layout::ChannelsFirst)
    }

    /// `(N, *spatial, C)` in memory order.
    pub fn channels_last(dims: &[usize]) -> Result<Shape> {
        Shape::new(dims, Layout::ChannelsLast)
    }

    /// From PyTorch-style logical dims `(N, C, *spatial)` and a memory layout
    /// (as `x.shape` plus `memory_format` in PyTorch).
    pub fn from_logical(logical: &[usize], layout: Layout) -> Result<Shape> {
        match layout {
            Layout::ChannelsFirst => Shape::new(logical, layout),
            Layout::ChannelsLast => {
                if !(2..=5).contains(&logical.len()) {
                    return Err(Error::InvalidRank { dims: logical.to_vec() });
                }
                let mut d = Vec::with_capacity(logical.len());
                d.push(logical[0]);
                d.extend_from_slice(&logical[2..]);
                d.push(logical[1]);
                Shape::new(&d, layout)
            }
        }
    }

    /// The dims in memory order, as given.
    pub fn dims(&self) -> &[usize] {
        &self.dims
    }

    /// The dims as PyTorch reports `x.shape`: `(N, C, *spatial)` whatever the layout.
    pub fn logical_dims(&self) -> Vec<usize> {
        match self.layout {
            Layout::ChannelsFirst => self.dims.clone(),
            Layout::ChannelsLast => {
                let k = self.dims.len();
                let mut d = vec![self.dims[0], self.dims[k - 1]];
                d.extend_from_slice(&self.dims[1..k - 1]);
                d
            }
        }
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }
    /// Batch size N.
    pub fn n(&self) -> usize {
        self.n
    }
    /// Channel count C.
    pub fn c(&self) -> usize {
        self.c
    }
    /// Product of the spatial dims (1 for `(N, C)`).
    pub fn spatial(&self) -> usize {
        self.spatial
    }
    /// Values per channel: `N * spatial`.
    pub fn m(&self) -> usize {
        self.n * self.spatial
    }
    /// Total element count `N * C * spatial`.
    pub fn numel(&self) -> usize {
        self.n * self.c * self.spatial
    }

    /// The memory pattern the kernels see. With one spatial position the two layouts are
    /// the same `[N][C]` matrix, which is handled as channels-last (rows of C).
    pub(crate) fn pattern(&self) -> Pattern {
        if self.layout == Layout::ChannelsLast || self.spatial == 1 {
            Pattern::Rows { rows: self.n * self.spatial, c: self.c }
        } else {
            Pattern::Planes { n: self.n, c: self.c, s: self.spatial }
        }
    }

    /// Index of element `(n, c, s)` (s: flat spatial index) in memory.
    pub fn offset(&self, n: usize, c: usize, s: usize) -> usize {
        match self.layout {
            Layout::ChannelsFirst => (n * self.c + c) * self.spatial + s,
            Layout::ChannelsLast => (n * self.spatial + s) * self.c + c,
        }
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", crate::error::Dims(&self.dims), self.layout.short())
    }
}

/// How a channel's values are spread through memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pattern {
    /// `[n][c][s]`: channel c is n runs of s contiguous values.
    Planes { n: usize, c: usize, s: usize },
    /// `[rows][c]`: channel c is a column of a row-major matrix.
    Rows { rows: usize, c: usize },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logical_and_memory_dims_round_trip() {
        let s = Shape::from_logical(&[2, 3, 4, 5], Layout::ChannelsLast).unwrap();
        assert_eq!(s.dims(), &[2, 4, 5, 3]);
        assert_eq!(s.logical_dims(), vec![2, 3, 4, 5]);
        assert_eq!(s.offset(1, 2, 19), (20 + 19) * 3 + 2);
        let s = Shape::channels_first(&[2, 3, 4, 5]).unwrap();
        assert_eq!(s.offset(1, 2, 19), (3 + 2) * 20 + 19);
    }

    #[test]
    fn bad_shapes_are_named() {
        assert!(matches!(Shape::channels_first(&[3]), Err(Error::InvalidRank { .. })));
        assert!(matches!(Shape::channels_first(&[1, 2, 3, 4, 5, 6]), Err(Error::InvalidRank { .. })));
        assert!(matches!(Shape::channels_last(&[3, 4, 0]), Err(Error::ZeroChannels { .. })));
        assert!(matches!(Shape::channels_first(&[0, 4]), Err(Error::EmptyReduction { .. })));
        assert!(matches!(Shape::channels_first(&[usize::MAX, 4, 4]), Err(Error::ShapeOverflow { .. })));
    }

    #[test]
    fn one_spatial_position_is_rows() {
        let a = Shape::channels_first(&[7, 5]).unwrap();
        let b = Shape::channels_first(&[7, 5, 1, 1]).unwrap();
        assert_eq!(a.pattern(), Pattern::Rows { rows: 7, c: 5 });
        assert_eq!(b.pattern(), Pattern::Rows { rows: 7, c: 5 });
    }
}
