//! Device actors and device-resident arrays (feature `cuda`).
//!
//! A [`DeviceActor`] owns one GPU ([`Gpu`]: its context, its stream, and through the
//! stream-ordered allocator the device's memory pool) on a thread of its own, and runs the
//! work sent to it there, one item at a time, in arrival order (a `WorkQueue`, shared with
//! the XLA actor, is that thread). A [`DeviceArray`] is an f32
//! array that lives in that device's memory; a `Ref<DeviceArray>` names one like any other
//! value.
//!
//! Invariants:
//! 1. Work given to [`DeviceActor::run`] runs on the actor's thread once every input `Ref` is
//!    ready; if an input failed, the work does not run and its output fails with
//!    `Error::DependencyFailed`.
//! 2. An input already on the actor's device reaches the work as the same device buffer (a
//!    shared handle, no copy). Only an input held on the host (one that crossed a process
//!    boundary) or on another device is copied onto this device, and each such copy is
//!    counted ([`DeviceActor::copies_in`]). A copy from another device is one
//!    device-to-device copy (the driver's peer copy), not a round trip through the host.
//! 3. Reading a `Ref<DeviceArray>` (`get`, `blocking_get`) yields another handle to the same
//!    device buffer; bytes move to the host only through [`DeviceArray::to_host`], or when
//!    the value is encoded to cross a process boundary (the encoding is the host copy).
//! 4. A device buffer is freed (`cuMemFreeAsync` on the device's stream) when the last
//!    handle to it drops: the last `Ref`, and every array read from it.
//!
//! Shutdown:
//! 1. The runtime holds its actors until it shuts down (so tasks that get one, one after
//!    another, find the same actor); then, or when the last handle drops after that, the
//!    queue closes; work still waiting for inputs then fails with `Error::Shutdown`.
//! 2. Its thread finishes the work already queued and exits; the drop joins it (unless the
//!    drop happens on that thread).
//! 3. Arrays still alive keep their `Gpu` (and so the context) alive until they drop.
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use cudarc::driver::CudaSlice;
use serde::{Deserialize, Serialize};

use super::cuda::{DeviceError, Gpu, GpuCsr};
use super::element_count as elements;
use super::work_queue::{input_of, Input, WorkQueue};
use crate::actors::object::ObjectTable;
use crate::actors::reference::{blocking_read, Payload};
use crate::array::CsrBlock;
use crate::{Error, Ref, Runtime};

/// Device memory owned by one array handle family; freed when the last handle drops.
struct DeviceBuffer {
    gpu: Arc<Gpu>,
    slice: CudaSlice<f32>,
    /// The owning actor's count of live device bytes.
    live: Arc<AtomicUsize>,
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        self.live.fetch_sub(self.slice.len() * 4, Ordering::Relaxed);
        // `slice` drops after this: cudarc frees it on the device's stream, which needs the
        // device's context current on this thread (any thread may drop the last handle).
        self.gpu.make_current();
    }
}

#[derive(Clone)]
enum Storage {
    /// In a device's memory.
    Device(Arc<DeviceBuffer>),
    /// On the host: made by [`DeviceArray::from_host`] or decoded after crossing a process
    /// boundary; the first device actor that uses it uploads it.
    Host(Arc<Vec<f32>>),
}

/// An f32 array in a GPU's memory (or staged on the host until a device actor uploads it).
///
/// Cloning shares the buffer. Encoding it (to send it to another process) copies it to the
/// host; decoding gives a host-staged array.
#[derive(Clone)]
pub struct DeviceArray {
    shape: Vec<usize>,
    storage: Storage,
}

impl std::fmt::Debug for DeviceArray {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceArray").field("shape", &self.shape).field("device", &self.device()).finish()
    }
}

impl DeviceArray {
    /// A host-staged array; a device actor uploads it when it first uses it.
    ///
    /// # Errors
    /// [`DeviceError::Shape`] if `data` does not hold `shape`'s number of elements.
    pub fn from_host(data: Vec<f32>, shape: Vec<usize>) -> Result<DeviceArray, DeviceError> {
        if elements(&shape) != Some(data.len()) {
            return Err(DeviceError::Shape {
                op: "DeviceArray::from_host",
                message: format!("shape {shape:?} vs {} elements", data.len()),
            });
        }
        Ok(DeviceArray { shape, storage: Storage::Host(Arc::new(data)) })
    }

    /// The array's shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        match &self.storage {
            Storage::Device(buffer) => buffer.slice.len(),
            Storage::Host(data) => data.len(),
        }
    }

    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The ordinal of the device holding it, or `None` while it is staged on the host.
    pub fn device(&self) -> Option<usize> {
        match &self.storage {
            Storage::Device(buffer) => Some(buffer.gpu.ordinal()),
            Storage::Host(_) => None,
        }
    }

    /// The device buffer, if it is on a device (for kernels run in [`DeviceActor::run`]).
    pub fn slice(&self) -> Option<&CudaSlice<f32>> {
        match &self.storage {
            Storage::Device(buffer) => Some(&buffer.slice),
            Storage::Host(_) => None,
        }
    }

    /// Whether `self` and `other` are handles to the same buffer (no copy between them).
    pub fn same_buffer(&self, other: &DeviceArray) -> bool {
        match (&self.storage, &other.storage) {
            (Storage::Device(a), Storage::Device(b)) => Arc::ptr_eq(a, b),
            (Storage::Host(a), Storage::Host(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// Copies the array to the host. The copy is queued on the device's stream, after all
    /// work queued there before, and waited for.
    ///
    /// # Errors
    /// [`DeviceError::Driver`].
    pub fn to_host(&self) -> Result<Vec<f32>, DeviceError> {
        match &self.storage {
            Storage::Device(buffer) => buffer.gpu.download(&buffer.slice),
            Storage::Host(data) => Ok(data.as_ref().clone()),
        }
    }

    /// The size of its data in bytes.
    pub(crate) fn byte_len(&self) -> usize {
        self.len() * 4
    }
}

/// The encoded form: the host copy.
#[derive(Serialize, Deserialize)]
struct HostForm {
    shape: Vec<usize>,
    data: Vec<f32>,
}

impl Serialize for DeviceArray {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let data = self.to_host().map_err(serde::ser::Error::custom)?;
        HostForm { shape: self.shape.clone(), data }.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for DeviceArray {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let HostForm { shape, data } = HostForm::deserialize(deserializer)?;
        DeviceArray::from_host(data, shape).map_err(serde::de::Error::custom)
    }
}

/// Device memory of one CSR matrix handle family; freed when the last handle drops.
struct CsrBuffer {
    gpu: Arc<Gpu>,
    csr: GpuCsr,
    live: Arc<AtomicUsize>,
}

impl Drop for CsrBuffer {
    fn drop(&mut self) {
        self.live.fetch_sub(self.csr.byte_len(), Ordering::Relaxed);
        // `csr` drops after this and makes its device's context current to free its arrays.
    }
}

#[derive(Clone)]
enum CsrStorage {
    Device(Arc<CsrBuffer>),
    /// A block of a sparse array (its arrays are shared, so cloning copies nothing).
    Host(CsrBlock<f32>),
}

/// A CSR matrix (f32 values, 32-bit indices) in a GPU's memory, or staged on the host until
/// a device actor uploads it: the device form of a sparse array's block. Like
/// [`DeviceArray`], cloning shares it, encoding copies it to the host, and its memory is
/// freed with the last handle.
#[derive(Clone)]
pub(crate) struct DeviceCsr {
    storage: CsrStorage,
}

impl DeviceCsr {
    /// (rows, columns).
    pub(crate) fn shape(&self) -> (usize, usize) {
        match &self.storage {
            CsrStorage::Device(buffer) => buffer.csr.shape(),
            CsrStorage::Host(block) => (block.rows, block.cols),
        }
    }

    /// The device holding it, or `None` while staged on the host.
    pub(crate) fn device(&self) -> Option<usize> {
        match &self.storage {
            CsrStorage::Device(buffer) => Some(buffer.gpu.ordinal()),
            CsrStorage::Host(_) => None,
        }
    }

    /// The device matrix, if it is on a device.
    pub(crate) fn csr(&self) -> Option<&GpuCsr> {
        match &self.storage {
            CsrStorage::Device(buffer) => Some(&buffer.csr),
            CsrStorage::Host(_) => None,
        }
    }

    /// The matrix on the host, as a sparse array's block (a copy queued after the work that
    /// made it, and waited for).
    pub(crate) fn to_host(&self) -> Result<CsrBlock<f32>, DeviceError> {
        match &self.storage {
            CsrStorage::Device(buffer) => {
                let (rows, cols) = buffer.csr.shape();
                let (offsets, columns, values) = buffer.gpu.download_csr_arrays(&buffer.csr)?;
                let offsets = offsets.into_iter().map(|o| o.max(0) as u64).collect();
                let columns = columns.into_iter().map(|c| c.max(0) as u32).collect();
                CsrBlock::from_arrays(rows, cols, offsets, columns, values)
                    .map_err(|e| DeviceError::Shape { op: "DeviceCsr::to_host", message: e.to_string() })
            }
            CsrStorage::Host(block) => Ok(block.clone()),
        }
    }

    /// Its device memory in bytes (0 while staged on the host).
    pub(crate) fn byte_len(&self) -> usize {
        self.csr().map_or(0, GpuCsr::byte_len)
    }
}

impl Serialize for DeviceCsr {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_host().map_err(serde::ser::Error::custom)?.serialize(serializer)
    }
}

/// The encoded form is the block's, which is checked when decoded (so a malformed matrix
/// from a peer never reaches cuSPARSE).
impl<'de> Deserialize<'de> for DeviceCsr {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(DeviceCsr { storage: CsrStorage::Host(CsrBlock::deserialize(deserializer)?) })
    }
}

/// What work run by a device actor gets: its device, and a way to wrap new buffers as
/// arrays (counted against the actor's live memory).
pub struct DeviceScope {
    gpu: Arc<Gpu>,
    live: Arc<AtomicUsize>,
}

impl std::fmt::Debug for DeviceScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceScope").field("device", &self.gpu.ordinal()).finish()
    }
}

impl DeviceScope {
    /// The device.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Wraps a buffer made on this device as an array of `shape`.
    ///
    /// # Errors
    /// [`DeviceError::Shape`] if the buffer does not hold `shape`'s number of elements.
    pub fn array(&self, slice: CudaSlice<f32>, shape: Vec<usize>) -> Result<DeviceArray, DeviceError> {
        if elements(&shape) != Some(slice.len()) {
            return Err(DeviceError::Shape {
                op: "DeviceScope::array",
                message: format!("shape {shape:?} vs {} elements", slice.len()),
            });
        }
        self.live.fetch_add(slice.len() * 4, Ordering::Relaxed);
        let buffer = DeviceBuffer { gpu: self.gpu.clone(), slice, live: self.live.clone() };
        Ok(DeviceArray { shape, storage: Storage::Device(Arc::new(buffer)) })
    }

    /// A zeroed array of `shape` on this device.
    ///
    /// # Errors
    /// [`DeviceError::Shape`] if the size overflows; [`DeviceError::Driver`] (out of memory).
    pub fn zeros(&self, shape: Vec<usize>) -> Result<DeviceArray, DeviceError> {
        let len = elements(&shape).ok_or_else(|| DeviceError::Shape {
            op: "zeros",
            message: format!("shape {shape:?} overflows"),
        })?;
        self.array(self.gpu.zeros(len)?, shape)
    }

    /// Copies a sparse array's block to this device as CSR with 32-bit indices.
    ///
    /// # Errors
    /// [`DeviceError::Shape`] if an offset or column exceeds 32 bits; [`DeviceError::Driver`].
    pub(crate) fn upload_csr(&self, block: &CsrBlock<f32>) -> Result<DeviceCsr, DeviceError> {
        fn narrow<I: Copy + TryInto<i32>>(items: &[I], what: &str) -> Result<Vec<i32>, DeviceError> {
            items.iter().map(|&v| v.try_into()).collect::<Result<_, _>>().map_err(|_| DeviceError::Shape {
                op: "upload_csr",
                message: format!("{what} exceeds 32 bits (cuSPARSE is used with 32-bit indices)"),
            })
        }
        let offsets = narrow(&block.offsets, "an offset")?;
        let columns = narrow(&block.indices, "a column index")?;
        let csr = self.gpu.upload_csr_arrays(block.rows, block.cols, &offsets, &columns, &block.values)?;
        self.live.fetch_add(csr.byte_len(), Ordering::Relaxed);
        let buffer = CsrBuffer { gpu: self.gpu.clone(), csr, live: self.live.clone() };
        Ok(DeviceCsr { storage: CsrStorage::Device(Arc::new(buffer)) })
    }

    /// Copies host data to this device.
    ///
    /// # Errors
    /// [`DeviceError::Shape`], [`DeviceError::Driver`].
    pub fn upload(&self, data: &[f32], shape: Vec<usize>) -> Result<DeviceArray, DeviceError> {
        self.array(self.gpu.upload(data)?, shape)
    }
}

struct ActorShared {
    ordinal: usize,
    gpu: Arc<Gpu>,
    live: Arc<AtomicUsize>,
    copies_in: Arc<AtomicU64>,
    queue: Arc<WorkQueue<DeviceScope>>,
}

/// The actor that owns one GPU for a runtime: its context, stream and memory, on a thread
/// of its own. Cheap to clone; it runs until its runtime shuts down and its last clone
/// drops.
///
/// # Examples
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let rt = tessera::Runtime::local()?;
/// let gpu = tessera::DeviceActor::get(&rt, 0)?; // fails with NoDevice where there is none
/// let x = gpu.upload(vec![1.0, -2.0, 3.0], vec![3]);
/// let y = gpu.run(&[x.clone()], |scope, inputs| {
///     let mut out = scope.gpu().zeros(3)?;
///     let input = inputs[0].slice().expect("on the device");
///     scope.gpu().copy(input, &mut out)?;
///     scope.gpu().relu(&mut out)?;
///     scope.array(out, vec![3])
/// });
/// assert_eq!(y.blocking_get()?.to_host()?, vec![1.0, 0.0, 3.0]);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct DeviceActor {
    shared: Arc<ActorShared>,
}

impl std::fmt::Debug for DeviceActor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceActor").field("ordinal", &self.shared.ordinal).finish()
    }
}

impl DeviceActor {
    /// The device actor of GPU `ordinal` for `rt`: the running one, or a new one (which
    /// opens the device and starts its thread).
    ///
    /// # Errors
    /// [`DeviceError::NoDevice`] without a driver or without such a device (never a panic);
    /// [`DeviceError::Driver`] if the context cannot be made current on the actor's thread.
    pub fn get(rt: &Runtime, ordinal: usize) -> Result<DeviceActor, DeviceError> {
        let table = rt.core().table.clone();
        let shared = rt.core().device_actor(
            |shared: &ActorShared| shared.ordinal == ordinal,
            || DeviceActor::start(table, ordinal).map(|actor| actor.shared),
        )?;
        Ok(DeviceActor { shared })
    }

    fn start(table: Arc<ObjectTable>, ordinal: usize) -> Result<DeviceActor, DeviceError> {
        let gpu = Arc::new(Gpu::open(ordinal)?);
        let live = Arc::new(AtomicUsize::new(0));
        let scope = DeviceScope { gpu: gpu.clone(), live: live.clone() };
        let queue = WorkQueue::start(
            table,
            format!("device#{ordinal}"),
            format!("tessera-gpu-{ordinal}"),
            move || scope.gpu.bind_to_thread().map(|()| scope),
            |message| DeviceError::Driver { device: ordinal, message },
        )?;
        let shared = ActorShared { ordinal, gpu, live, copies_in: Arc::new(AtomicU64::new(0)), queue };
        Ok(DeviceActor { shared: Arc::new(shared) })
    }

    /// The device actors of every GPU of this process for `rt` (see [`get`](DeviceActor::get)),
    /// in ordinal order.
    ///
    /// # Errors
    /// [`DeviceError::NoDevice`] where there is no driver or no GPU; as
    /// [`get`](DeviceActor::get) for each device.
    pub fn all(rt: &Runtime) -> Result<Vec<DeviceActor>, DeviceError> {
        let devices = super::cuda::cuda_devices()?;
        devices.iter().map(|device| DeviceActor::get(rt, device.ordinal)).collect()
    }

    /// Whether this actor serves `rt` (its values live in `rt`'s object table).
    pub(crate) fn serves(&self, rt: &Runtime) -> bool {
        Arc::ptr_eq(self.shared.queue.table(), &rt.core().table)
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.shared.ordinal
    }

    /// The device, for direct use (its stream is the one the actor's work is queued on).
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.shared.gpu
    }

    /// Bytes of device memory held now by arrays this actor made (freed as their last
    /// handles drop).
    pub fn live_bytes(&self) -> usize {
        self.shared.live.load(Ordering::Relaxed)
    }

    /// How many inputs so far had to be copied onto this device (they were on the host or
    /// another device); inputs already here are never copied.
    pub fn copies_in(&self) -> u64 {
        self.shared.copies_in.load(Ordering::Relaxed)
    }

    /// Uploads `data` (of `shape`) to the device; the `Ref` names the device-resident array.
    pub fn upload(&self, data: Vec<f32>, shape: Vec<usize>) -> Ref<DeviceArray> {
        self.run(&[], move |scope, _| scope.upload(&data, shape))
    }

    /// Runs `work` on the actor's thread once every input is ready, giving it the inputs as
    /// arrays on this device (those already here are the same buffers, not copies); the
    /// returned `Ref` names the array it makes. Errors and panics of `work` fail the `Ref`
    /// (`Error::TaskFailed`, `Error::TaskPanicked`, task name `device#<ordinal>`).
    pub fn run<F>(&self, inputs: &[Ref<DeviceArray>], work: F) -> Ref<DeviceArray>
    where
        F: FnOnce(&DeviceScope, &[DeviceArray]) -> Result<DeviceArray, DeviceError> + Send + 'static,
    {
        self.run_to(inputs, work, DeviceArray::byte_len)
    }

    /// [`run`](DeviceActor::run) for work that makes any value (a host copy, a reduction):
    /// `size` gives the value's size in bytes, for the object table's accounting.
    pub(crate) fn run_to<R, F>(&self, inputs: &[Ref<DeviceArray>], work: F, size: fn(&R) -> usize) -> Ref<R>
    where
        R: Payload,
        F: FnOnce(&DeviceScope, &[DeviceArray]) -> Result<R, DeviceError> + Send + 'static,
    {
        let inputs: Vec<Ref<DeviceArray>> = inputs.to_vec();
        let ids: Vec<Input> = inputs.iter().map(input_of).collect();
        let copies_in = self.shared.copies_in.clone();
        self.submit(ids, size, move |scope, task| {
            let arrays = read_inputs(scope, &inputs, &copies_in, task)?;
            drop(inputs);
            work(scope, &arrays).map_err(|e| device_failed(task, e))
        })
    }

    /// Runs `work` on the actor's thread once `input` (any value, held here or on a node)
    /// is ready, giving it the value: how host data enters the device.
    pub(crate) fn run_from<T, R, F>(&self, input: &Ref<T>, work: F, size: fn(&R) -> usize) -> Ref<R>
    where
        T: Payload,
        R: Payload,
        F: FnOnce(&DeviceScope, T) -> Result<R, DeviceError> + Send + 'static,
    {
        let input = input.clone();
        self.submit(vec![input_of(&input)], size, move |scope, task| {
            let value = blocking_read::<T>(&input.inner, None)?;
            drop(input);
            work(scope, value).map_err(|e| device_failed(task, e))
        })
    }

    /// [`run_to`](DeviceActor::run_to) with a sparse matrix first: `work` gets `matrix` on
    /// this device (a counted copy if it was elsewhere) and the arrays.
    pub(crate) fn run_sparse<R, F>(
        &self,
        matrix: &Ref<DeviceCsr>,
        inputs: &[Ref<DeviceArray>],
        work: F,
        size: fn(&R) -> usize,
    ) -> Ref<R>
    where
        R: Payload,
        F: FnOnce(&DeviceScope, &DeviceCsr, &[DeviceArray]) -> Result<R, DeviceError> + Send + 'static,
    {
        let matrix = matrix.clone();
        let inputs: Vec<Ref<DeviceArray>> = inputs.to_vec();
        let ids: Vec<Input> = std::iter::once(input_of(&matrix)).chain(inputs.iter().map(input_of)).collect();
        let copies_in = self.shared.copies_in.clone();
        self.submit(ids, size, move |scope, task| {
            let csr = blocking_read::<DeviceCsr>(&matrix.inner, None)?;
            let csr = adopt_csr(scope, csr, &copies_in).map_err(|e| device_failed(task, e))?;
            let arrays = read_inputs(scope, &inputs, &copies_in, task)?;
            drop((matrix, inputs));
            work(scope, &csr, &arrays).map_err(|e| device_failed(task, e))
        })
    }

    /// Queues `job` once every input in `ids` is ready; its value (or error, or panic)
    /// completes the returned `Ref`.
    fn submit<R, J>(&self, ids: Vec<Input>, size: fn(&R) -> usize, job: J) -> Ref<R>
    where
        R: Payload,
        J: FnOnce(&DeviceScope, &str) -> Result<R, Error> + Send + 'static,
    {
        let mut outputs =
            self.shared.queue.submit(ids, 1, size, move |scope, task| Ok(vec![job(scope, task)?]));
        outputs.pop().expect("one output")
    }
}

fn device_failed(task: &str, error: DeviceError) -> Error {
    Error::TaskFailed { task: task.to_string(), message: error.to_string() }
}

/// An input as an array on the scope's device: the same buffer if it is there already,
/// else a counted copy (host → device, or from another device directly).
fn adopt(scope: &DeviceScope, array: DeviceArray, copies_in: &AtomicU64) -> Result<DeviceArray, DeviceError> {
    if array.device() == Some(scope.gpu.ordinal()) {
        return Ok(array);
    }
    copies_in.fetch_add(1, Ordering::Relaxed);
    match &array.storage {
        Storage::Device(buffer) if !buffer.slice.is_empty() => {
            let copy = scope.gpu.copy_from_peer(&buffer.gpu, &buffer.slice)?;
            scope.array(copy, array.shape)
        }
        _ => scope.upload(&array.to_host()?, array.shape),
    }
}

/// Each input as an array on the scope's device (see [`adopt`]), once read.
fn read_inputs(
    scope: &DeviceScope,
    inputs: &[Ref<DeviceArray>],
    copies_in: &AtomicU64,
    task: &str,
) -> Result<Vec<DeviceArray>, Error> {
    inputs
        .iter()
        .map(|input| {
            let array = blocking_read::<DeviceArray>(&input.inner, None)?;
            adopt(scope, array, copies_in).map_err(|e| device_failed(task, e))
        })
        .collect()
}

/// A sparse matrix on the scope's device: the same one if it is there already, else a
/// counted copy (as [`adopt`] does for arrays).
fn adopt_csr(scope: &DeviceScope, csr: DeviceCsr, copies_in: &AtomicU64) -> Result<DeviceCsr, DeviceError> {
    if csr.device() == Some(scope.gpu.ordinal()) {
        return Ok(csr);
    }
    copies_in.fetch_add(1, Ordering::Relaxed);
    scope.upload_csr(&csr.to_host()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A block's encoding as `CsrBlock` writes it: rows, columns, then offsets (u64),
    /// columns (u32) and values (f32) as little-endian bytes.
    fn encoded(offsets: &[u64], columns: &[u32]) -> Vec<u8> {
        let bytes = |items: &[u8]| serde_bytes::ByteBuf::from(items.to_vec());
        let values = vec![1f32; columns.len()];
        let raw = (
            offsets.len().saturating_sub(1),
            3usize,
            bytes(bytemuck::cast_slice(offsets)),
            bytes(bytemuck::cast_slice(columns)),
            bytes(bytemuck::cast_slice(&values)),
        );
        bincode::serde::encode_to_vec(raw, bincode::config::standard()).unwrap()
    }

    /// A CSR matrix that arrives from another process is checked before any device sees it.
    #[test]
    fn malformed_csr_matrices_are_refused_when_decoded() {
        let decode = |bytes: &[u8]| {
            bincode::serde::decode_from_slice::<DeviceCsr, _>(bytes, bincode::config::standard())
                .map(|(m, _)| m)
        };
        let good = decode(&encoded(&[0, 1, 3], &[2, 0, 1])).expect("a valid matrix");
        assert_eq!((good.shape(), good.device()), ((2, 3), None));
        for (offsets, columns, why) in [
            (&[0u64, 2, 1][..], &[0u32, 1][..], "decrease"),
            (&[1, 2, 3], &[0, 1, 2], "offsets for 2 rows"),
            (&[0, 1, 2], &[0, 1, 2], "nonzeros announced"),
            (&[0, 1, 2], &[0, 3], "column 3"),
        ] {
            let error = decode(&encoded(offsets, columns)).err().unwrap_or_else(|| panic!("decoded ({why})"));
            assert!(error.to_string().contains(why), "{error}");
        }
    }
}
