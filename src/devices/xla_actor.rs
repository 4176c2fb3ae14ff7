//! The XLA device actor and XLA-resident arrays (feature `xla`).
//!
//! An [`XlaActor`] owns one XLA device (a PJRT plugin's client and its first device) for a
//! runtime, on a thread of its own (a `WorkQueue`, as CUDA's device actors), and runs the
//! work sent to it there, one item at a time, in arrival order: uploads, compiled StableHLO
//! programs ([`XlaActor::call`]) and any closure over the device ([`XlaActor::run`]). An
//! [`XlaArray`] is an f32 or i32 array in that device's memory; a `Ref<XlaArray>` names one
//! like any other value, so programs chain on the device without host round trips.
//!
//! Invariants:
//! 1. Work runs once every input `Ref` is ready; if an input failed, the work does not run
//!    and its outputs fail with `Error::DependencyFailed`.
//! 2. An input already on the actor's device reaches the work as the same PJRT buffer (a
//!    shared handle, no copy). Only an input staged on the host (made by
//!    [`XlaArray::from_host`], or one that crossed a process boundary) or held by another
//!    actor is copied onto this device, and each such copy is counted
//!    ([`XlaActor::copies_in`]).
//! 3. Reading a `Ref<XlaArray>` yields another handle to the same buffer; bytes move to the
//!    host only through [`XlaArray::to_host`], or when the value is encoded to cross a
//!    process boundary (the encoding is the host copy, and decoding checks it).
//! 4. A buffer is destroyed when the last handle to it drops; [`XlaActor::live_bytes`]
//!    counts the buffers alive.
//! 5. A program runs only on the actor that compiled it, and only on buffers of that
//!    actor's client (PJRT must not mix clients).
//!
//! Shutdown: the runtime holds its actors until it shuts down (so tasks that get one, one
//! after another, find the same actor and its compiled programs). Then, once the last
//! handle has dropped too, waiting work fails with `Error::Shutdown`, queued work
//! finishes, and arrays still alive keep the client alive until they drop.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::element_count as elements;
use super::work_queue::{input_of, Input, WorkQueue};
use super::xla::{XlaBuffer, XlaDevice, XlaElement, XlaElementType, XlaError, XlaExecutable};
use crate::actors::object::ObjectTable;
use crate::actors::reference::blocking_read;
use crate::{Error, Ref, Runtime};

/// A PJRT buffer owned by one array handle family; destroyed when the last handle drops.
struct Resident {
    buffer: XlaBuffer,
    /// The actor whose client holds it.
    actor: u64,
    bytes: usize,
    /// The owning actor's count of live device bytes.
    live: Arc<AtomicUsize>,
}

impl Drop for Resident {
    fn drop(&mut self) {
        self.live.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// Host data of an array staged on the host (also the encoded form's data).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
enum HostData {
    F32(Vec<f32>),
    I32(Vec<i32>),
}

impl HostData {
    fn wrap<T: XlaElement>(data: Vec<T>) -> HostData {
        match T::TYPE {
            XlaElementType::F32 => HostData::F32(bytemuck::allocation::cast_vec(data)),
            XlaElementType::I32 => HostData::I32(bytemuck::allocation::cast_vec(data)),
        }
    }

    fn element_type(&self) -> XlaElementType {
        match self {
            HostData::F32(_) => XlaElementType::F32,
            HostData::I32(_) => XlaElementType::I32,
        }
    }

    fn len(&self) -> usize {
        match self {
            HostData::F32(v) => v.len(),
            HostData::I32(v) => v.len(),
        }
    }

    /// The data as `T`s, if they are of `T`'s type.
    fn view<T: XlaElement>(&self) -> Result<&[T], XlaError> {
        let wrong = || XlaError::ElementType { expected: T::PJRT_TYPE, got: self.element_type().pjrt() };
        match (self, T::TYPE) {
            (HostData::F32(v), XlaElementType::F32) => Ok(bytemuck::cast_slice(v)),
            (HostData::I32(v), XlaElementType::I32) => Ok(bytemuck::cast_slice(v)),
            _ => Err(wrong()),
        }
    }

    fn upload(&self, device: &XlaDevice, dims: &[usize]) -> Result<XlaBuffer, XlaError> {
        match self {
            HostData::F32(v) => device.upload(v, dims),
            HostData::I32(v) => device.upload(v, dims),
        }
    }
}

#[derive(Clone)]
enum Storage {
    Device(Arc<Resident>),
    Host(Arc<HostData>),
}

/// An f32 or i32 array in an XLA device's memory (or staged on the host until an
/// [`XlaActor`] uploads it).
///
/// Cloning shares the buffer. Encoding it (to send it to another process) copies it to the
/// host; decoding gives a host-staged array, checked against its shape.
#[derive(Clone)]
pub struct XlaArray {
    dims: Vec<usize>,
    element: XlaElementType,
    storage: Storage,
}

impl std::fmt::Debug for XlaArray {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XlaArray")
            .field("dims", &self.dims)
            .field("element", &self.element)
            .field("on_device", &self.is_on_device())
            .finish()
    }
}

impl XlaArray {
    /// A host-staged array; an actor uploads it when it first uses it.
    ///
    /// # Errors
    /// [`XlaError::Length`] if `data` does not hold `dims`' number of elements.
    pub fn from_host<T: XlaElement>(data: Vec<T>, dims: Vec<usize>) -> Result<XlaArray, XlaError> {
        XlaArray::staged(HostData::wrap(data), dims)
    }

    fn staged(data: HostData, dims: Vec<usize>) -> Result<XlaArray, XlaError> {
        let expected = elements(&dims).ok_or_else(|| XlaError::Length {
            what: format!("array of shape {dims:?} (overflows)"),
            expected: usize::MAX,
            got: data.len(),
        })?;
        if expected != data.len() {
            return Err(XlaError::Length {
                what: format!("array of shape {dims:?}"),
                expected,
                got: data.len(),
            });
        }
        Ok(XlaArray { dims, element: data.element_type(), storage: Storage::Host(Arc::new(data)) })
    }

    /// The array's shape.
    pub fn dims(&self) -> &[usize] {
        &self.dims
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.dims.iter().product()
    }

    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The element type.
    pub fn element_type(&self) -> XlaElementType {
        self.element
    }

    /// Whether it is in a device's memory (not staged on the host).
    pub fn is_on_device(&self) -> bool {
        matches!(self.storage, Storage::Device(_))
    }

    /// Whether `actor`'s device holds it (so `actor` uses it without a copy).
    pub fn is_on(&self, actor: &XlaActor) -> bool {
        self.actor() == Some(actor.shared.id)
    }

    fn actor(&self) -> Option<u64> {
        match &self.storage {
            Storage::Device(resident) => Some(resident.actor),
            Storage::Host(_) => None,
        }
    }

    /// The device buffer, if it is on a device (for programs run in [`XlaActor::run`]).
    pub fn buffer(&self) -> Option<&XlaBuffer> {
        match &self.storage {
            Storage::Device(resident) => Some(&resident.buffer),
            Storage::Host(_) => None,
        }
    }

    /// Whether `self` and `other` are handles to the same buffer (no copy between them).
    pub fn same_buffer(&self, other: &XlaArray) -> bool {
        match (&self.storage, &other.storage) {
            (Storage::Device(a), Storage::Device(b)) => Arc::ptr_eq(a, b),
            (Storage::Host(a), Storage::Host(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// Copies the array to the host (waiting for the work that makes it).
    ///
    /// # Errors
    /// [`XlaError::ElementType`] if the array's elements are not `T`s; [`XlaError::Call`].
    pub fn to_host<T: XlaElement>(&self) -> Result<Vec<T>, XlaError> {
        match &self.storage {
            Storage::Device(resident) => resident.buffer.download::<T>(),
            Storage::Host(data) => data.view::<T>().map(<[T]>::to_vec),
        }
    }

    fn host_data(&self) -> Result<HostData, XlaError> {
        match &self.storage {
            Storage::Device(resident) => Ok(match self.element {
                XlaElementType::F32 => HostData::F32(resident.buffer.download()?),
                XlaElementType::I32 => HostData::I32(resident.buffer.download()?),
            }),
            Storage::Host(data) => Ok(data.as_ref().clone()),
        }
    }

    /// The size of its data in bytes.
    pub(crate) fn byte_len(&self) -> usize {
        self.len() * self.element.size()
    }
}

/// The encoded form: the host copy.
#[derive(Serialize, Deserialize)]
struct HostForm {
    dims: Vec<usize>,
    data: HostData,
}

impl Serialize for XlaArray {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let data = self.host_data().map_err(serde::ser::Error::custom)?;
        HostForm { dims: self.dims.clone(), data }.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for XlaArray {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let HostForm { dims, data } = HostForm::deserialize(deserializer)?;
        XlaArray::staged(data, dims).map_err(serde::de::Error::custom)
    }
}

/// What work run by an XLA actor gets: its device, and a way to wrap new buffers as arrays
/// (counted against the actor's live memory).
pub struct XlaScope {
    device: XlaDevice,
    actor: u64,
    live: Arc<AtomicUsize>,
}

impl std::fmt::Debug for XlaScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XlaScope").field("device", &self.device).finish()
    }
}

impl XlaScope {
    /// The device.
    pub fn device(&self) -> &XlaDevice {
        &self.device
    }

    /// Wraps a buffer made on this device (an upload, a program's output) as an array.
    ///
    /// # Errors
    /// [`XlaError::UnsupportedType`] for elements other than f32 and i32;
    /// [`XlaError::ForeignBuffer`] for a buffer of another client; [`XlaError::Call`].
    pub fn array(&self, buffer: XlaBuffer) -> Result<XlaArray, XlaError> {
        if !self.device.holds(&buffer) {
            return Err(XlaError::ForeignBuffer { argument: 0 });
        }
        let element = buffer.element_type()?;
        let dims = buffer.dims()?;
        let bytes = elements(&dims).unwrap_or(0) * element.size();
        self.live.fetch_add(bytes, Ordering::Relaxed);
        let resident = Resident { buffer, actor: self.actor, bytes, live: self.live.clone() };
        Ok(XlaArray { dims, element, storage: Storage::Device(Arc::new(resident)) })
    }

    /// Copies host data to this device.
    ///
    /// # Errors
    /// [`XlaError::Length`], [`XlaError::Call`].
    pub fn upload<T: XlaElement>(&self, data: &[T], dims: &[usize]) -> Result<XlaArray, XlaError> {
        self.array(self.device.upload(data, dims)?)
    }

    /// An input as an array on this device: the same buffer if it is here already, else a
    /// counted copy (invariant 2).
    fn adopt(&self, array: XlaArray, copies_in: &AtomicU64) -> Result<XlaArray, XlaError> {
        if array.actor() == Some(self.actor) {
            return Ok(array);
        }
        copies_in.fetch_add(1, Ordering::Relaxed);
        let buffer = match &array.storage {
            Storage::Host(data) => data.upload(&self.device, &array.dims)?,
            Storage::Device(_) => array.host_data()?.upload(&self.device, &array.dims)?,
        };
        self.array(buffer)
    }
}

/// A StableHLO program compiled by one [`XlaActor`], which runs it ([`XlaActor::call`]).
/// Cheap to clone.
#[derive(Clone)]
pub struct XlaProgram {
    actor: u64,
    executable: Arc<XlaExecutable>,
}

impl std::fmt::Debug for XlaProgram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XlaProgram").field("outputs", &self.outputs()).finish()
    }
}

impl XlaProgram {
    /// The number of arrays a call returns.
    pub fn outputs(&self) -> usize {
        self.executable.outputs()
    }
}

/// How many compiled programs an actor keeps by default ([`XlaActor::set_program_cache`]).
pub const DEFAULT_XLA_PROGRAM_CACHE: usize = 256;

/// Compiled programs by their text, the least recently used dropped beyond a capacity (a
/// dropped program lives on in the `XlaProgram`s handed out, and is compiled again if its
/// text comes back).
struct ProgramCache<P> {
    capacity: usize,
    /// Each program with the tick of its last use.
    programs: HashMap<String, (P, u64)>,
    tick: u64,
}

impl<P: Clone> ProgramCache<P> {
    fn new(capacity: usize) -> Self {
        ProgramCache { capacity, programs: HashMap::new(), tick: 0 }
    }

    /// The program compiled from `text`, if kept; marks it used.
    fn get(&mut self, text: &str) -> Option<P> {
        self.tick += 1;
        let tick = self.tick;
        self.programs.get_mut(text).map(|(program, used)| {
            *used = tick;
            program.clone()
        })
    }

    /// Keeps `program` under `text`, dropping the least recently used beyond the capacity.
    fn insert(&mut self, text: &str, program: P) {
        self.tick += 1;
        self.programs.insert(text.to_string(), (program, self.tick));
        self.shrink();
    }

    fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity;
        self.shrink();
    }

    fn shrink(&mut self) {
        while self.programs.len() > self.capacity {
            let oldest =
                self.programs.iter().min_by_key(|(_, (_, used))| *used).map(|(text, _)| text.clone());
            match oldest {
                Some(text) => self.programs.remove(&text),
                None => break,
            };
        }
    }

    fn len(&self) -> usize {
        self.programs.len()
    }
}

struct ActorShared {
    id: u64,
    plugin: PathBuf,
    device: XlaDevice,
    live: Arc<AtomicUsize>,
    copies_in: Arc<AtomicU64>,
    programs: Mutex<ProgramCache<XlaProgram>>,
    queue: Arc<WorkQueue<XlaScope>>,
}

/// The actor that owns an XLA device for a runtime: a PJRT plugin's client and its first
/// device, on a thread of its own. Cheap to clone; it runs until its runtime shuts down
/// and its last clone drops.
///
/// # Examples
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let rt = tessera::Runtime::local()?;
/// let xla = tessera::XlaActor::get(&rt)?; // the plugin of TESSERA_PJRT_PLUGIN, or the CPU one
/// let double = xla.compile(
///     "func.func @main(%x: tensor<3xf32>) -> tensor<3xf32> {
///        %0 = stablehlo.add %x, %x : tensor<3xf32>
///        return %0 : tensor<3xf32>
///      }",
/// )?;
/// let x = xla.upload(vec![1.0f32, -2.0, 3.0], vec![3]);
/// let y = xla.call(&double, &[x]).remove(0); // stays on the device
/// let z = xla.call(&double, &[y]).remove(0); // no host round trip in between
/// assert_eq!(z.blocking_get()?.to_host::<f32>()?, vec![4.0, -8.0, 12.0]);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct XlaActor {
    shared: Arc<ActorShared>,
}

impl std::fmt::Debug for XlaActor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XlaActor")
            .field("platform", &self.shared.device.platform())
            .field("plugin", &self.shared.plugin)
            .finish()
    }
}

/// Numbers the actors of this process (an array records the one holding it).
static NEXT_ACTOR: AtomicU64 = AtomicU64::new(1);

impl XlaActor {
    /// The XLA actor of `rt` for the plugin named by `TESSERA_PJRT_PLUGIN`, or the CPU plugin
    /// that `scripts/install-deps.sh` installs (see [`XlaActor::get_plugin`]).
    ///
    /// # Errors
    /// As [`XlaActor::get_plugin`].
    pub fn get(rt: &Runtime) -> Result<XlaActor, XlaError> {
        XlaActor::get_plugin(rt, &XlaDevice::default_plugin())
    }

    /// The XLA actor of `rt` for the PJRT plugin at `plugin`: the running one, or a new one
    /// (which creates a client and starts its thread).
    ///
    /// # Errors
    /// As [`XlaDevice::open`]: a missing or unusable plugin, a client that cannot be made,
    /// no device.
    pub fn get_plugin(rt: &Runtime, plugin: &Path) -> Result<XlaActor, XlaError> {
        let table = rt.core().table.clone();
        let shared = rt.core().device_actor(
            |shared: &ActorShared| shared.plugin == plugin,
            || XlaActor::start(table, plugin).map(|actor| actor.shared),
        )?;
        Ok(XlaActor { shared })
    }

    fn start(table: Arc<ObjectTable>, plugin: &Path) -> Result<XlaActor, XlaError> {
        let device = XlaDevice::open(plugin)?;
        let id = NEXT_ACTOR.fetch_add(1, Ordering::Relaxed);
        let live = Arc::new(AtomicUsize::new(0));
        let scope = XlaScope { device: device.clone(), actor: id, live: live.clone() };
        let queue = WorkQueue::start(
            table,
            format!("xla:{}", device.platform()),
            format!("tessera-xla-{id}"),
            move || Ok(scope),
            |message| XlaError::Call { call: "starting the XLA actor", message },
        )?;
        let shared = ActorShared {
            id,
            plugin: plugin.to_path_buf(),
            device,
            live,
            copies_in: Arc::new(AtomicU64::new(0)),
            programs: Mutex::new(ProgramCache::new(DEFAULT_XLA_PROGRAM_CACHE)),
            queue,
        };
        Ok(XlaActor { shared: Arc::new(shared) })
    }

    /// The platform's name (e.g. "cpu", "cuda").
    pub fn platform(&self) -> &str {
        self.shared.device.platform()
    }

    /// The actor's device, sharing its client: for an [`XlaExecutor`](crate::nn::XlaExecutor)
    /// or [`XlaTrainer`](crate::nn::XlaTrainer) in the same process, so that the process
    /// keeps one client of the plugin (see [`XlaDevice::open`]). They run their programs on
    /// the calling thread, beside the actor's work (PJRT clients are thread-safe).
    pub fn device(&self) -> XlaDevice {
        self.shared.device.clone()
    }

    /// Bytes of device memory held now by arrays this actor made (freed as their last
    /// handles drop).
    pub fn live_bytes(&self) -> usize {
        self.shared.live.load(Ordering::Relaxed)
    }

    /// How many inputs so far had to be copied onto this device (they were on the host or
    /// held by another actor); inputs already here are never copied.
    pub fn copies_in(&self) -> u64 {
        self.shared.copies_in.load(Ordering::Relaxed)
    }

    /// Compiles a StableHLO module (MLIR text) whose `main` function [`call`](Self::call)
    /// runs, on the calling thread; a program this actor compiled before is reused. The
    /// actor keeps the [`DEFAULT_XLA_PROGRAM_CACHE`] programs used last, by their text (see
    /// [`set_program_cache`](Self::set_program_cache)); a program handed out stays valid
    /// when the cache drops it.
    ///
    /// # Errors
    /// [`XlaError::Call`] with the compiler's message if the program does not compile.
    pub fn compile(&self, stablehlo: &str) -> Result<XlaProgram, XlaError> {
        if let Some(program) = self.shared.programs.lock().get(stablehlo) {
            return Ok(program);
        }
        let executable = Arc::new(self.shared.device.compile(stablehlo)?);
        let program = XlaProgram { actor: self.shared.id, executable };
        self.shared.programs.lock().insert(stablehlo, program.clone());
        Ok(program)
    }

    /// Sets how many compiled programs the actor keeps (for every user of this actor),
    /// dropping the least recently used beyond it now; 0 keeps none.
    pub fn set_program_cache(&self, capacity: usize) {
        self.shared.programs.lock().set_capacity(capacity);
    }

    /// How many compiled programs the actor keeps now.
    pub fn cached_programs(&self) -> usize {
        self.shared.programs.lock().len()
    }

    /// Uploads `data` (of shape `dims`) to the device; the `Ref` names the device-resident
    /// array.
    pub fn upload<T: XlaElement>(&self, data: Vec<T>, dims: Vec<usize>) -> Ref<XlaArray> {
        self.run(&[], move |scope, _| scope.upload(&data, &dims))
    }

    /// Runs `program` on the actor's thread once every input is ready, with the inputs as
    /// its arguments in order (those already on this device are passed as they are, others
    /// are copied here first); one `Ref` per output, each naming a device-resident array.
    /// A failed run (arguments of the wrong shape or number, a program of another actor)
    /// fails every output with `Error::TaskFailed` and the plugin's message.
    pub fn call(&self, program: &XlaProgram, inputs: &[Ref<XlaArray>]) -> Vec<Ref<XlaArray>> {
        let program = program.clone();
        let actor = self.shared.id;
        self.run_each(inputs, program.outputs(), move |scope, arrays| {
            if program.actor != actor {
                return Err(XlaError::Call {
                    call: "XlaActor::call",
                    message: "the program was compiled by another XLA actor; compile it with this one".into(),
                });
            }
            let buffers: Vec<&XlaBuffer> = arrays.iter().filter_map(XlaArray::buffer).collect();
            let outputs = program.executable.run(&buffers)?;
            outputs.into_iter().map(|buffer| scope.array(buffer)).collect()
        })
    }

    /// Runs `work` on the actor's thread once every input is ready, giving it the inputs as
    /// arrays on this device (those already here are the same buffers, not copies); the
    /// returned `Ref` names the array it makes. Errors and panics of `work` fail the `Ref`
    /// (`Error::TaskFailed`, `Error::TaskPanicked`, task name `xla:<platform>`).
    pub fn run<F>(&self, inputs: &[Ref<XlaArray>], work: F) -> Ref<XlaArray>
    where
        F: FnOnce(&XlaScope, &[XlaArray]) -> Result<XlaArray, XlaError> + Send + 'static,
    {
        let mut outputs = self.run_each(inputs, 1, move |scope, arrays| Ok(vec![work(scope, arrays)?]));
        outputs.pop().expect("one output")
    }

    fn run_each<F>(&self, inputs: &[Ref<XlaArray>], outputs: usize, work: F) -> Vec<Ref<XlaArray>>
    where
        F: FnOnce(&XlaScope, &[XlaArray]) -> Result<Vec<XlaArray>, XlaError> + Send + 'static,
    {
        let inputs: Vec<Ref<XlaArray>> = inputs.to_vec();
        let ids: Vec<Input> = inputs.iter().map(input_of).collect();
        let copies_in = self.shared.copies_in.clone();
        self.shared.queue.submit(ids, outputs, XlaArray::byte_len, move |scope, task| {
            let failed = |e: XlaError| Error::TaskFailed { task: task.to_string(), message: e.to_string() };
            let arrays = inputs
                .iter()
                .map(|input| {
                    let array = blocking_read::<XlaArray>(&input.inner, None)?;
                    scope.adopt(array, &copies_in).map_err(failed)
                })
                .collect::<Result<Vec<_>, Error>>()?;
            drop(inputs);
            work(scope, &arrays).map_err(failed)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &[u8]) -> Result<XlaArray, bincode::error::DecodeError> {
        bincode::serde::decode_from_slice::<XlaArray, _>(bytes, bincode::config::standard()).map(|(a, _)| a)
    }

    fn encode<T: Serialize>(value: &T) -> Vec<u8> {
        bincode::serde::encode_to_vec(value, bincode::config::standard()).unwrap()
    }

    /// The program cache keeps the programs used last, up to its capacity.
    #[test]
    fn the_program_cache_drops_the_least_recently_used() {
        let mut cache = ProgramCache::new(3);
        for (text, program) in [("a", 1), ("b", 2), ("c", 3)] {
            cache.insert(text, program);
        }
        assert_eq!(cache.get("a"), Some(1));
        cache.insert("d", 4);
        assert_eq!((cache.len(), cache.get("b")), (3, None), "b was used least recently");
        assert_eq!((cache.get("a"), cache.get("c"), cache.get("d")), (Some(1), Some(3), Some(4)));
        cache.set_capacity(1);
        assert_eq!((cache.len(), cache.get("d")), (1, Some(4)));
        cache.set_capacity(0);
        assert_eq!((cache.len(), cache.get("d")), (0, None));
        cache.insert("e", 5);
        assert_eq!(cache.len(), 0);
    }

    /// An array crosses a process boundary as its host copy, with its element type; one
    /// whose data does not fill its shape is refused when decoded.
    #[test]
    fn arrays_round_trip_as_host_copies_and_malformed_ones_are_refused() {
        let ints = XlaArray::from_host(vec![1i32, -2, 3, 4, 5, 6], vec![2, 3]).unwrap();
        let back = decode(&encode(&ints)).unwrap();
        assert_eq!(
            (back.dims(), back.element_type(), back.is_on_device()),
            (&[2, 3][..], XlaElementType::I32, false)
        );
        assert_eq!(back.to_host::<i32>().unwrap(), vec![1, -2, 3, 4, 5, 6]);
        assert!(matches!(back.to_host::<f32>(), Err(XlaError::ElementType { .. })));

        let short = HostForm { dims: vec![2, 2], data: HostData::F32(vec![1.0; 3]) };
        let error = decode(&encode(&short)).unwrap_err();
        assert!(error.to_string().contains("expected 4 elements, got 3"), "{error}");
        let overflowing = HostForm { dims: vec![usize::MAX, 2], data: HostData::F32(vec![]) };
        assert!(decode(&encode(&overflowing)).unwrap_err().to_string().contains("overflows"));
    }
}
