//! Memory readings for load reports, benchmarks and the VAE tiling decision: this process's resident and peak
//! resident host memory (`/proc/self/status`), resetting the peak (`/proc/self/clear_refs`), the host's available
//! memory (`/proc/meminfo`), and a device's free memory (the CUDA driver's, or the host's for the CPU). Every
//! reading is `None` where the platform does not offer it.

use candle_core::Device;

fn status_kib(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    kib_field(&text, field)
}

fn kib_field(text: &str, field: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(field))?;
    let value = line[field.len()..].trim_start_matches(':').trim();
    let kib: u64 = value.split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}

/// Resident host memory of this process, in bytes.
pub fn rss_bytes() -> Option<u64> {
    status_kib("VmRSS")
}

/// Peak resident host memory of this process since start or the last [`reset_peak_rss`], in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    status_kib("VmHWM")
}

/// Resets the peak resident memory to the current one (Linux: `5` into `/proc/self/clear_refs`). Returns whether
/// it could.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Memory the host can give without swapping (`MemAvailable`), in bytes.
pub fn host_available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    kib_field(&text, "MemAvailable")
}

/// Free memory of `device` in bytes: the driver's count on CUDA, the host's available memory on the CPU.
pub fn device_free_bytes(device: &Device) -> Option<u64> {
    match device {
        Device::Cpu => host_available_bytes(),
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => d
            .cuda_stream()
            .context()
            .mem_get_info()
            .ok()
            .map(|(free, _)| free as u64),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_parse_and_the_process_has_memory() {
        assert_eq!(
            kib_field("VmHWM:\t  1234 kB\nVmRSS:\t 10 kB\n", "VmRSS"),
            Some(10 * 1024)
        );
        assert_eq!(kib_field("MemAvailable:   5 kB", "MemAvailable"), Some(5 * 1024));
        assert_eq!(kib_field("Other: 1 kB", "VmRSS"), None);
        if cfg!(target_os = "linux") {
            let rss = rss_bytes().expect("rss");
            assert!(rss > 0 && peak_rss_bytes().expect("peak") >= rss);
            assert!(device_free_bytes(&Device::Cpu).expect("available") > 0);
        }
    }
}
