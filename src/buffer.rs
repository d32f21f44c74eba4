//! Buffers the ops read ([`Buf`]) and write ([`BufMut`]): host slices, or (with the `cuda`
//! feature) views of device memory. Every op checks that all of its buffers live where the
//! chosen [`Device`](crate::Device) runs, before it touches any of them.
//!
//! Host buffers convert with `.into()` from `&[T]`, `&Vec<T>`, `&mut [T]` and `&mut Vec<T>`;
//! device buffers from `&CudaSlice<T>`, `CudaView`, `&mut CudaSlice<T>` and `CudaViewMut`.

use std::fmt;

#[cfg(feature = "cuda")]
use cudarc::driver::DeviceSlice;

/// Where a buffer's memory lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Location {
    /// Ordinary (host) memory.
    Host,
    /// Memory of the CUDA device with this ordinal.
    Cuda(usize),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Host => f.write_str("host memory"),
            Location::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// A buffer an op reads.
#[non_exhaustive]
pub enum Buf<'a, T> {
    Host(&'a [T]),
    #[cfg(feature = "cuda")]
    Cuda(cudarc::driver::CudaView<'a, T>),
}

/// A buffer an op writes.
#[non_exhaustive]
pub enum BufMut<'a, T> {
    Host(&'a mut [T]),
    #[cfg(feature = "cuda")]
    Cuda(cudarc::driver::CudaViewMut<'a, T>),
}

impl<T> Buf<'_, T> {
    /// Element count.
    pub fn len(&self) -> usize {
        match self {
            Buf::Host(s) => s.len(),
            #[cfg(feature = "cuda")]
            Buf::Cuda(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Where the memory lives.
    pub fn location(&self) -> Location {
        match self {
            Buf::Host(_) => Location::Host,
            #[cfg(feature = "cuda")]
            Buf::Cuda(v) => Location::Cuda(v.stream().context().ordinal()),
        }
    }
    /// The host slice, if this is host memory.
    pub fn as_host(&self) -> Option<&[T]> {
        match self {
            Buf::Host(s) => Some(s),
            #[cfg(feature = "cuda")]
            Buf::Cuda(_) => None,
        }
    }
}

impl<'a, T> BufMut<'a, T> {
    /// Element count.
    pub fn len(&self) -> usize {
        match self {
            BufMut::Host(s) => s.len(),
            #[cfg(feature = "cuda")]
            BufMut::Cuda(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Where the memory lives.
    pub fn location(&self) -> Location {
        match self {
            BufMut::Host(_) => Location::Host,
            #[cfg(feature = "cuda")]
            BufMut::Cuda(v) => Location::Cuda(v.stream().context().ordinal()),
        }
    }
    /// The host slice, if this is host memory.
    pub fn as_host(&self) -> Option<&[T]> {
        match self {
            BufMut::Host(s) => Some(s),
            #[cfg(feature = "cuda")]
            BufMut::Cuda(_) => None,
        }
    }
    /// The host slice, if this is host memory.
    pub fn into_host(self) -> Option<&'a mut [T]> {
        match self {
            BufMut::Host(s) => Some(s),
            #[cfg(feature = "cuda")]
            BufMut::Cuda(_) => None,
        }
    }
}

impl<'a, T> From<&'a [T]> for Buf<'a, T> {
    fn from(s: &'a [T]) -> Self {
        Buf::Host(s)
    }
}
impl<'a, T> From<&'a Vec<T>> for Buf<'a, T> {
    fn from(s: &'a Vec<T>) -> Self {
        Buf::Host(s)
    }
}
impl<'a, T, const N: usize> From<&'a [T; N]> for Buf<'a, T> {
    fn from(s: &'a [T; N]) -> Self {
        Buf::Host(s)
    }
}
impl<'a, T> From<&'a mut [T]> for BufMut<'a, T> {
    fn from(s: &'a mut [T]) -> Self {
        BufMut::Host(s)
    }
}
impl<'a, T> From<&'a mut Vec<T>> for BufMut<'a, T> {
    fn from(s: &'a mut Vec<T>) -> Self {
        BufMut::Host(s)
    }
}
impl<'a, T, const N: usize> From<&'a mut [T; N]> for BufMut<'a, T> {
    fn from(s: &'a mut [T; N]) -> Self {
        BufMut::Host(s)
    }
}

#[cfg(feature = "cuda")]
mod cuda_conversions {
    use super::{Buf, BufMut};
    use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};

    impl<'a, T> From<&'a CudaSlice<T>> for Buf<'a, T> {
        fn from(s: &'a CudaSlice<T>) -> Self {
            Buf::Cuda(s.as_view())
        }
    }
    impl<'a, T> From<CudaView<'a, T>> for Buf<'a, T> {
        fn from(v: CudaView<'a, T>) -> Self {
            Buf::Cuda(v)
        }
    }
    impl<'a, T> From<&'a mut CudaSlice<T>> for BufMut<'a, T> {
        fn from(s: &'a mut CudaSlice<T>) -> Self {
            BufMut::Cuda(s.as_view_mut())
        }
    }
    impl<'a, T> From<CudaViewMut<'a, T>> for BufMut<'a, T> {
        fn from(v: CudaViewMut<'a, T>) -> Self {
            BufMut::Cuda(v)
        }
    }
}
