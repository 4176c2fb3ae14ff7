//! Which GPUs this process can use, as nodes report them when they join: a plain,
//! serializable description that exists in every build (empty without feature `cuda`).
//!
//! Discovery runs once per process and is cached. It never panics: without the `cuda`
//! feature, without a driver or without a device the list is empty and
//! [`gpu_absence_reason`] says why.
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

/// One GPU as discovery sees it (what a node reports to the head when it joins).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct GpuInfo {
    /// The device ordinal on its machine.
    pub ordinal: usize,
    /// Its name, as the driver reports it.
    pub name: String,
    /// Its memory, in bytes.
    pub total_memory: u64,
}

struct Discovered {
    gpus: Vec<GpuInfo>,
    absent: Option<String>,
}

static LOCAL: OnceLock<Discovered> = OnceLock::new();

fn discovered() -> &'static Discovered {
    LOCAL.get_or_init(|| {
        let found = discover();
        match &found {
            Ok(gpus) => tracing::info!(count = gpus.len(), "CUDA devices found"),
            Err(reason) => tracing::info!(%reason, "no CUDA device"),
        }
        match found {
            Ok(gpus) => Discovered { gpus, absent: None },
            Err(reason) => Discovered { gpus: Vec::new(), absent: Some(reason) },
        }
    })
}

#[cfg(feature = "cuda")]
fn discover() -> Result<Vec<GpuInfo>, String> {
    super::cuda_devices()
        .map(|devices| {
            devices
                .into_iter()
                .map(|d| GpuInfo { ordinal: d.ordinal, name: d.name, total_memory: d.total_memory as u64 })
                .collect()
        })
        .map_err(|e| e.to_string())
}

#[cfg(not(feature = "cuda"))]
fn discover() -> Result<Vec<GpuInfo>, String> {
    Err("this build has no CUDA support (feature `cuda` is off)".into())
}

/// The GPUs this process can use (found once, then cached; empty if there are none).
pub fn local_gpus() -> Vec<GpuInfo> {
    discovered().gpus.clone()
}

/// Why [`local_gpus`] is empty (no `cuda` feature, no driver, no device), or `None` if this
/// process has GPUs.
pub fn gpu_absence_reason() -> Option<&'static str> {
    discovered().absent.as_deref()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_is_consistent_and_never_panics() {
        let gpus = local_gpus();
        assert_eq!(gpus.is_empty(), gpu_absence_reason().is_some(), "{gpus:?} {:?}", gpu_absence_reason());
        for (i, gpu) in gpus.iter().enumerate() {
            assert_eq!(gpu.ordinal, i);
        }
        #[cfg(not(feature = "cuda"))]
        assert!(gpu_absence_reason().is_some_and(|r| r.contains("feature `cuda`")));
    }
}
