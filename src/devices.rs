//! Devices and the collectives that connect them: the `Communicator` trait that gradient
//! all-reduce uses, with a TCP backend for CPUs; GPU and XLA discovery (every build); CUDA
//! devices, device actors, device-resident arrays, and collectives over device buffers
//! (NCCL, or a host group staged through host memory) (feature `cuda`); XLA devices through
//! PJRT plugins, the XLA device actor and XLA-resident arrays (feature `xla`); collectives
//! over UCX (feature `ucx`).
mod collective;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
mod device_actor;
mod discovery;
#[cfg(feature = "cuda")]
mod gpu_group;
#[cfg(feature = "cuda")]
mod nccl;
#[cfg(feature = "ucx")]
mod ucx_group;
#[cfg(any(feature = "cuda", feature = "xla"))]
mod work_queue;
#[cfg(feature = "xla")]
mod xla;
#[cfg(feature = "xla")]
mod xla_actor;

/// The number of elements of `shape`, or `None` if it overflows (the device arrays'
/// shape check).
#[cfg(any(feature = "cuda", feature = "xla"))]
fn element_count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1_usize, |n, &d| n.checked_mul(d))
}

pub use collective::{
    segment, CollectiveError, Communicator, GroupConfig, GroupListener, Rendezvous, TcpGroup,
};
#[cfg(feature = "cuda")]
pub(crate) use cuda::{
    column_tiles, grid, kernel_index, launch, len_u32, make_current, one_block, push_checked, rows_config,
    Gemm32,
};
#[cfg(feature = "cuda")]
pub use cuda::{
    compile_all_kernels, compile_all_kernels_for, cuda_devices, CudaDeviceInfo, DeviceError, Gpu, GpuCsr,
    KERNELS, KERNEL_PRELUDE,
};
#[cfg(feature = "cuda")]
pub(crate) use device_actor::DeviceCsr;
#[cfg(feature = "cuda")]
pub use device_actor::{DeviceActor, DeviceArray};
pub use discovery::{gpu_absence_reason, local_gpus, local_xla, xla_absence_reason, GpuInfo, XlaInfo};
#[cfg(feature = "cuda")]
pub use gpu_group::{GpuCommunicator, HostStagedGroup};
#[cfg(feature = "cuda")]
pub use nccl::{NcclGroup, NCCL_TIMEOUT};
#[cfg(feature = "ucx")]
pub use ucx_group::UcxGroup;
#[cfg(feature = "xla")]
pub use xla::{
    XlaBuffer, XlaDevice, XlaElement, XlaElementType, XlaError, XlaExecutable, DEFAULT_PJRT_PLUGIN,
};
#[cfg(feature = "xla")]
pub use xla_actor::{XlaActor, XlaArray, XlaProgram, XlaScope, DEFAULT_XLA_PROGRAM_CACHE};
