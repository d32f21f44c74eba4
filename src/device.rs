//! Which backend runs the ops: [`Device::auto`], [`Device::cpu`], [`Device::cuda`], and the
//! `BNORM_DEVICE` environment variable.

use crate::buffer::Location;
use crate::cpu::CpuDevice;
use crate::error::{Error, Result};
use std::fmt;

/// Environment variable that forces the device `Device::auto` picks: `cpu`, `cuda` or `cuda:N`.
pub const DEVICE_ENV: &str = "BNORM_DEVICE";

/// Where the ops run, and why this device was chosen.
///
/// ```
/// use bnorm::Device;
/// let cpu = Device::cpu();
/// assert!(cpu.is_cpu());
/// assert_eq!(cpu.name(), "cpu");
/// // `auto` honours BNORM_DEVICE, else takes a usable GPU, else the CPU; it says why.
/// let dev = Device::auto().unwrap();
/// println!("running on {dev}: {}", dev.reason());
/// ```
#[derive(Clone, Debug)]
pub struct Device {
    backend: Backend,
    reason: String,
}

#[derive(Clone, Debug)]
pub(crate) enum Backend {
    Cpu(CpuDevice),
    #[cfg(feature = "cuda")]
    Cuda(crate::cuda::CudaDevice),
}

/// What device a string or `BNORM_DEVICE` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Auto,
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<DeviceSpec> {
        let t = s.trim().to_ascii_lowercase();
        let bad = || Error::InvalidDeviceSpec { value: s.to_string() };
        match t.as_str() {
            "auto" | "" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            _ => {
                let n = t.strip_prefix("cuda:").or_else(|| t.strip_prefix("gpu:")).ok_or_else(bad)?;
                n.parse::<usize>().map(DeviceSpec::Cuda).map_err(|_| bad())
            }
        }
    }
}

impl Device {
    /// The CPU backend with rayon's global pool and the best SIMD level.
    pub fn cpu() -> Device {
        Device::from_cpu(CpuDevice::new(), "asked for the CPU")
    }

    /// A configured CPU backend (thread count, SIMD level).
    pub fn from_cpu(cpu: CpuDevice, reason: impl Into<String>) -> Device {
        Device { backend: Backend::Cpu(cpu), reason: reason.into() }
    }

    /// CUDA device `ordinal`. Errors (never panics) when there is no driver, no such
    /// device, or the kernels were not compiled into this build.
    pub fn cuda(ordinal: usize) -> Result<Device> {
        #[cfg(feature = "cuda")]
        {
            let dev = crate::cuda::CudaDevice::new(ordinal)?;
            Ok(Device { backend: Backend::Cuda(dev), reason: format!("asked for cuda:{ordinal}") })
        }
        #[cfg(not(feature = "cuda"))]
        Err(Error::DeviceUnavailable {
            requested: format!("cuda:{ordinal}"),
            reason: "bnorm was built without the `cuda` feature".into(),
        })
    }

    /// A CUDA device the caller set up, e.g. on their own stream with
    /// [`CudaDevice::from_stream`](crate::cuda::CudaDevice::from_stream): the ops are then
    /// enqueued on that stream.
    #[cfg(feature = "cuda")]
    pub fn from_cuda(dev: crate::cuda::CudaDevice, reason: impl Into<String>) -> Device {
        Device { backend: Backend::Cuda(dev), reason: reason.into() }
    }

    /// What the spec asks for: `Auto` probes, `Cpu`/`Cuda(n)` are taken as given.
    pub fn from_spec(spec: DeviceSpec) -> Result<Device> {
        match spec {
            DeviceSpec::Cpu => Ok(Device::cpu()),
            DeviceSpec::Cuda(n) => Device::cuda(n),
            DeviceSpec::Auto => Ok(Device::probe()),
        }
    }

    /// `BNORM_DEVICE` if set (an error if it names a device that cannot be used: a forced
    /// choice never falls back silently), else the first CUDA device when a driver, a device
    /// and the compiled kernels are all present, else the CPU.
    pub fn auto() -> Result<Device> {
        match std::env::var(DEVICE_ENV) {
            Ok(v) if !v.trim().is_empty() => {
                let spec: DeviceSpec = v.parse()?;
                let mut d = Device::from_spec(spec)?;
                if spec != DeviceSpec::Auto {
                    d.reason = format!("{DEVICE_ENV}={v}");
                }
                Ok(d)
            }
            _ => Ok(Device::probe()),
        }
    }

    /// GPU if usable, else CPU, with the reason.
    fn probe() -> Device {
        #[cfg(feature = "cuda")]
        {
            match crate::cuda::CudaDevice::new(0) {
                Ok(dev) => {
                    return Device { reason: format!("auto: found {}", dev.describe()), backend: Backend::Cuda(dev) }
                }
                Err(e) => return Device::from_cpu(CpuDevice::new(), format!("auto: no usable GPU ({e})")),
            }
        }
        #[allow(unreachable_code)]
        Device::from_cpu(CpuDevice::new(), "auto: built without the `cuda` feature")
    }

    pub fn is_cpu(&self) -> bool {
        matches!(self.backend, Backend::Cpu(_))
    }

    pub fn is_cuda(&self) -> bool {
        !self.is_cpu()
    }

    /// `cpu` or `cuda:N`.
    pub fn name(&self) -> String {
        match &self.backend {
            Backend::Cpu(_) => "cpu".into(),
            #[cfg(feature = "cuda")]
            Backend::Cuda(d) => format!("cuda:{}", d.ordinal()),
        }
    }

    /// Why this device was chosen (`auto: no usable GPU (...)`, `BNORM_DEVICE=cpu`, ...).
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// The CPU backend, when this is the CPU.
    pub fn as_cpu(&self) -> Option<&CpuDevice> {
        match &self.backend {
            Backend::Cpu(c) => Some(c),
            #[cfg(feature = "cuda")]
            Backend::Cuda(_) => None,
        }
    }

    /// The CUDA backend, when this is a GPU.
    #[cfg(feature = "cuda")]
    pub fn as_cuda(&self) -> Option<&crate::cuda::CudaDevice> {
        match &self.backend {
            Backend::Cuda(c) => Some(c),
            Backend::Cpu(_) => None,
        }
    }

    /// Where buffers must live for this device's ops.
    pub fn location(&self) -> Location {
        match &self.backend {
            Backend::Cpu(_) => Location::Host,
            #[cfg(feature = "cuda")]
            Backend::Cuda(d) => Location::Cuda(d.ordinal()),
        }
    }

    pub(crate) fn backend(&self) -> &Backend {
        &self.backend
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.backend {
            Backend::Cpu(c) => write!(f, "cpu ({} threads, {}, {} stores)", c.threads(), c.simd(), c.stores()),
            #[cfg(feature = "cuda")]
            Backend::Cuda(d) => f.write_str(&d.describe()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("CUDA".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert!(matches!("tpu".parse::<DeviceSpec>(), Err(Error::InvalidDeviceSpec { .. })));
        assert!(matches!("cuda:x".parse::<DeviceSpec>(), Err(Error::InvalidDeviceSpec { .. })));
    }
}
