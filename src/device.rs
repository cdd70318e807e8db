//! Which device a command runs on: `--device cpu | cuda | cuda:N`, and the CUDA build's
//! fallback to the CPU when no GPU is usable.

use anyhow::{bail, Context, Result};
use candle_core::Device;

/// The device `--device` names (`None`: the first GPU of a CUDA build if usable, else the
/// CPU).
pub fn parse(spec: Option<&str>) -> Result<Device> {
    match spec {
        // A CUDA build uses the first GPU when there is one and the CPU otherwise (the same
        // binary runs the CPU tests on a machine without a GPU).
        None if candle_core::utils::cuda_is_available() => match new_cuda(0, "cuda:0") {
            Ok(d) => Ok(d),
            Err(e) => {
                eprintln!("note: no usable CUDA device ({e:#}); running on the CPU");
                Ok(Device::Cpu)
            }
        },
        None => Ok(Device::Cpu),
        Some("cpu") => Ok(Device::Cpu),
        Some(s) if s == "cuda" || s.starts_with("cuda:") => {
            if !candle_core::utils::cuda_is_available() {
                bail!(
                    "--device {s}: this build has no CUDA support (rebuild with --features cuda)"
                );
            }
            let n = match s.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .with_context(|| format!("--device {s}: expected cuda:N"))?,
                None => 0,
            };
            new_cuda(n, s)
        }
        Some(s) => bail!("--device {s}: expected cpu, cuda or cuda:N"),
    }
}

/// CUDA device `n`, or one line saying why not. The driver library is opened when the first
/// device is created, and cudarc panics if it is missing: that panic becomes the error.
fn new_cuda(n: usize, spec: &str) -> Result<Device> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let made = std::panic::catch_unwind(|| Device::new_cuda(n));
    std::panic::set_hook(hook);
    match made {
        Ok(Ok(d)) => Ok(d),
        Ok(Err(e)) => {
            let first = e.to_string();
            let first = first.lines().next().unwrap_or_default().to_string();
            bail!("--device {spec}: no such CUDA device ({first})")
        }
        Err(payload) => {
            let msg = crate::panic_message(payload.as_ref()).unwrap_or_default();
            // cudarc's message goes on to list every file name it tried.
            let first = msg
                .split(" - ")
                .next()
                .unwrap_or_default()
                .trim()
                .to_string();
            bail!(
                "--device {spec}: the NVIDIA driver library (libcuda.so) cannot be loaded; is \
                 an NVIDIA GPU with its driver installed? ({first})"
            )
        }
    }
}

/// The device in words ("cpu", "cuda:0").
pub fn name(d: &Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => format!("cuda ({:?})", d.location()),
        _ => format!("{:?}", d.location()),
    }
}

/// What the device can give a run or a generation: available RAM on the CPU (MemAvailable), free memory
/// on an NVIDIA GPU (from nvidia-smi, when present).
pub fn available_memory(device: &candle_core::Device) -> (String, Option<u64>) {
    match device {
        candle_core::Device::Cpu => {
            let avail = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("MemAvailable:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<u64>().ok())
                    .map(|kb| kb * 1024)
            });
            ("CPU RAM available".into(), avail)
        }
        other => {
            let ordinal = match other.location() {
                candle_core::DeviceLocation::Cuda { gpu_id } => gpu_id,
                _ => 0,
            };
            let free = std::process::Command::new("nvidia-smi")
                .args([
                    "--query-gpu=memory.free",
                    "--format=csv,noheader,nounits",
                    "-i",
                    &ordinal.to_string(),
                ])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .and_then(|o| String::from_utf8(o.stdout).ok())
                .and_then(|s| s.trim().parse::<u64>().ok())
                .map(|mib| mib << 20);
            (format!("GPU {ordinal} memory free"), free)
        }
    }
}

/// Makes the thread count an environment setting before any thread pool starts: sets
/// `RAYON_NUM_THREADS` to rayon's own default (the CPUs this process may use) unless the
/// user set it. Why: candle asks for the count before every matrix product and, without
/// the variable, counts physical cores by reading /proc/cpuinfo each time: 2,023 reads in a
/// 64-token decode of the benchmark model, a few percent of batch-1 decoding at the 2B
/// shape. With it set, both rayon and candle read the same number from the environment.
/// Call at the start of `main`, while the process has one thread.
pub fn settle_thread_count() {
    let default = std::thread::available_parallelism().map_or(1, |n| n.get());
    if let Some(v) = thread_count_setting(std::env::var_os("RAYON_NUM_THREADS"), default) {
        std::env::set_var("RAYON_NUM_THREADS", v);
    }
}

/// The value [`settle_thread_count`] gives `RAYON_NUM_THREADS` (`None`: leave it): the
/// default when unset or empty, as rayon then ignores it.
fn thread_count_setting(current: Option<std::ffi::OsString>, default: usize) -> Option<String> {
    match current {
        Some(v) if !v.is_empty() => None,
        _ => Some(default.max(1).to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A user's setting stays; an unset or empty one becomes the default.
    #[test]
    fn the_thread_count_is_set_only_when_the_user_did_not() {
        assert_eq!(thread_count_setting(None, 6), Some("6".into()));
        assert_eq!(thread_count_setting(Some("".into()), 6), Some("6".into()));
        assert_eq!(thread_count_setting(Some("3".into()), 6), None);
        assert_eq!(thread_count_setting(None, 0), Some("1".into()));
    }
}
