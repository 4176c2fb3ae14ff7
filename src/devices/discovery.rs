//! Which devices this process can use, as nodes report them when they join: its GPUs and
//! its XLA (PJRT) plugin, as plain, serializable descriptions that exist in every build
//! (none without feature `cuda`, resp. `xla`).
//!
//! Discovery runs once per process and is cached. It never panics: without the feature,
//! without a driver, device or plugin there is none and [`gpu_absence_reason`] or
//! [`xla_absence_reason`] says why.
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

/// The XLA plugin a process would run tasks on, as discovery found it (what a node reports
/// to the head when it joins): the plugin was loaded and its C API is one this build
/// speaks. Its platform name needs a client, which costs more than a node's start should,
/// so it is not part of the report; the plugin's path usually says it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct XlaInfo {
    /// The plugin's path on its machine (`TESSERA_PJRT_PLUGIN`, or the default where
    /// `scripts/install-deps.sh` puts the CPU plugin).
    pub plugin: String,
    /// Its PJRT C API version, major and minor.
    pub pjrt_api: (i32, i32),
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

static LOCAL_XLA: OnceLock<Result<XlaInfo, String>> = OnceLock::new();

fn discovered_xla() -> &'static Result<XlaInfo, String> {
    LOCAL_XLA.get_or_init(|| {
        let found = discover_xla();
        match &found {
            Ok(xla) => tracing::info!(plugin = %xla.plugin, "XLA plugin found"),
            Err(reason) => tracing::info!(%reason, "no XLA plugin"),
        }
        found
    })
}

#[cfg(feature = "xla")]
fn discover_xla() -> Result<XlaInfo, String> {
    let plugin = super::XlaDevice::default_plugin();
    let pjrt_api = super::XlaDevice::probe(&plugin).map_err(|e| e.to_string())?;
    Ok(XlaInfo { plugin: plugin.display().to_string(), pjrt_api })
}

#[cfg(not(feature = "xla"))]
fn discover_xla() -> Result<XlaInfo, String> {
    Err("this build has no XLA support (feature `xla` is off)".into())
}

/// The XLA plugin this process would run XLA tasks on (`XlaActor::get`'s: the one named by
/// `TESSERA_PJRT_PLUGIN`, or the default), if it loads; found once, then cached.
pub fn local_xla() -> Option<XlaInfo> {
    discovered_xla().as_ref().ok().cloned()
}

/// Why [`local_xla`] is `None` (no `xla` feature, no plugin file, a plugin that does not
/// load or speaks another C API), or `None` if this process has an XLA plugin.
pub fn xla_absence_reason() -> Option<&'static str> {
    discovered_xla().as_ref().err().map(String::as_str)
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

    #[test]
    fn xla_discovery_is_consistent_and_never_panics() {
        assert_eq!(local_xla().is_none(), xla_absence_reason().is_some(), "{:?}", xla_absence_reason());
        #[cfg(not(feature = "xla"))]
        assert!(xla_absence_reason().is_some_and(|r| r.contains("feature `xla`")));
        #[cfg(feature = "xla")]
        if let Some(xla) = local_xla() {
            assert!(std::path::Path::new(&xla.plugin).is_file(), "{xla:?}");
            assert_eq!(xla.pjrt_api.0, 0, "{xla:?}");
        }
    }
}
