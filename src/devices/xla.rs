//! XLA devices through PJRT plugins (feature `xla`): loading a plugin (a shared library
//! exporting `GetPjrtApi`), its client and first device, compiling StableHLO programs, and
//! running them on host data. Everything unsafe about the PJRT C API stays in this file.
//!
//! # Invariants
//! 1. A plugin is opened and initialized once per process and path, and never closed: PJRT
//!    plugins keep global state and threads that must outlive every client.
//! 2. Every PJRT object (client, executable, buffer, event, error) is owned by exactly one
//!    Rust value whose `Drop` destroys it; executables and buffers hold an `Arc` of their
//!    client, so the client is destroyed last.
//! 3. Every call's error is turned into an [`XlaError`] with the plugin's message; no PJRT
//!    failure panics.
use std::collections::HashMap;
use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::ptr::null_mut;
use std::sync::{Arc, Mutex, OnceLock};

#[allow(
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    dead_code,
    unreachable_pub,
    clippy::all
)]
mod ffi {
    include!(concat!(env!("OUT_DIR"), "/pjrt.rs"));
}

/// Where `scripts/install-deps.sh` puts the CPU plugin (`TESSERA_PJRT_PLUGIN` overrides it).
pub const DEFAULT_PJRT_PLUGIN: &str = "/opt/tessera-pjrt/xla_plugins/xla_cpu_pjrt/xla_cpu_pjrt.so";

/// The lowest PJRT C API minor version (major 0) whose structs this build fills.
const MIN_API_MINOR: i32 = 54;

/// Serialized `CompileOptionsProto` with `executable_build_options { num_replicas: 1,
/// num_partitions: 1 }`: one program on one device.
const COMPILE_OPTIONS: [u8; 6] = [0x1a, 0x04, 0x20, 0x01, 0x28, 0x01];

/// What went wrong with an XLA device.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum XlaError {
    /// No plugin file at the path.
    #[error("no PJRT plugin at {path}: run scripts/install-deps.sh (it installs PyPI's xla-cpu-pjrt there) or set TESSERA_PJRT_PLUGIN")]
    PluginNotFound {
        /// The path tried.
        path: PathBuf,
    },
    /// The file is not a loadable PJRT plugin.
    #[error("cannot load the PJRT plugin {path}: {message}")]
    PluginLoad {
        /// The plugin's path.
        path: PathBuf,
        /// The loader's message.
        message: String,
    },
    /// The plugin speaks a PJRT C API this build cannot use.
    #[error(
        "the PJRT plugin {path} has C API {major}.{minor}; Tessera needs 0.{MIN_API_MINOR} or newer 0.x"
    )]
    ApiVersion {
        /// The plugin's path.
        path: PathBuf,
        /// Its major version.
        major: i32,
        /// Its minor version.
        minor: i32,
    },
    /// The plugin lacks a function of the C API.
    #[error("the PJRT plugin has no `{0}`")]
    MissingFunction(&'static str),
    /// A PJRT call failed.
    #[error("{call} failed: {message}")]
    Call {
        /// The C API function.
        call: &'static str,
        /// The plugin's message.
        message: String,
    },
    /// The client has no device to run on.
    #[error("the PJRT client of {0} has no addressable device")]
    NoDevice(String),
    /// A download asked for another element type than the array's.
    #[error("the array's PJRT element type is {got}, not the {expected} asked for")]
    ElementType {
        /// The PJRT type code asked for.
        expected: u32,
        /// The array's PJRT type code.
        got: u32,
    },
    /// A program output of an element type Tessera does not move (only f32 and i32).
    #[error("PJRT element type {0} is not one Tessera moves (f32, i32)")]
    UnsupportedType(u32),
    /// A program was given an argument that its `main` does not declare.
    #[error("argument {argument}: {message}")]
    Argument {
        /// The argument's position.
        argument: usize,
        /// What does not match.
        message: String,
    },
    /// A program was given another number of arguments than its `main` declares.
    #[error("the program's main takes {expected} arguments, got {got}")]
    ArgumentCount {
        /// Parameters `main` declares.
        expected: usize,
        /// Arguments given.
        got: usize,
    },
    /// A program was given an array of another client (another device or actor).
    #[error("argument {argument} lives on another XLA client than the program's; copy it to the host first")]
    ForeignBuffer {
        /// The argument's position.
        argument: usize,
    },
    /// Host data does not fit the buffer or output it is meant for.
    #[error("{what}: expected {expected} elements, got {got}")]
    Length {
        /// Which buffer.
        what: String,
        /// Elements the shape holds.
        expected: usize,
        /// Elements given.
        got: usize,
    },
}

/// An opened, initialized plugin: the library stays loaded for the life of the process.
struct Plugin {
    path: PathBuf,
    api: &'static ffi::PJRT_Api,
    _library: libloading::Library,
}

// SAFETY: the PJRT C API is thread-safe (clients, buffers and executables may be used from
// any thread); the table itself is immutable after `GetPjrtApi`.
unsafe impl Send for Plugin {}
unsafe impl Sync for Plugin {}

/// A zeroed argument struct with `struct_size` set, as every PJRT call expects.
macro_rules! args {
    ($t:ident { $($field:ident : $value:expr),* $(,)? }) => {{
        // SAFETY: PJRT argument structs are plain C structs of pointers, sizes and enums,
        // for which all-zero bytes are the documented "unset" values.
        let mut a: ffi::$t = unsafe { std::mem::zeroed() };
        a.struct_size = std::mem::size_of::<ffi::$t>();
        $(a.$field = $value;)*
        a
    }};
}

/// Calls a PJRT function with an argument struct, turning its error into an [`XlaError`].
macro_rules! call {
    ($plugin:expr, $f:ident, $args:expr) => {{
        let plugin: &Plugin = $plugin;
        match plugin.api.$f {
            // SAFETY: `$args` is a properly sized struct of this call's argument type whose
            // pointers are valid for the duration of the call (see each call site).
            Some(f) => plugin.check(stringify!($f), unsafe { f($args) }),
            None => Err(XlaError::MissingFunction(stringify!($f))),
        }
    }};
}

impl Plugin {
    /// Opens and initializes the plugin at `path`, once per process (invariant 1).
    fn open(path: &Path) -> Result<Arc<Plugin>, XlaError> {
        static OPENED: OnceLock<Mutex<HashMap<PathBuf, Arc<Plugin>>>> = OnceLock::new();
        let mut opened = OPENED.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
        if let Some(plugin) = opened.get(path) {
            return Ok(plugin.clone());
        }
        if !path.is_file() {
            return Err(XlaError::PluginNotFound { path: path.to_path_buf() });
        }
        let load_error = |message: String| XlaError::PluginLoad { path: path.to_path_buf(), message };
        // SAFETY: loading a shared library runs its initializers; a PJRT plugin is built to
        // be loaded this way.
        let library = unsafe { libloading::Library::new(path) }.map_err(|e| load_error(e.to_string()))?;
        // SAFETY: `GetPjrtApi` has this signature in every PJRT plugin.
        let get_api: libloading::Symbol<unsafe extern "C" fn() -> *const ffi::PJRT_Api> =
            unsafe { library.get(b"GetPjrtApi\0") }.map_err(|e| load_error(e.to_string()))?;
        // SAFETY: the plugin returns a pointer to a static table, valid while it is loaded,
        // and it is never unloaded (invariant 1).
        let api: &'static ffi::PJRT_Api = match unsafe { get_api().as_ref() } {
            Some(api) => unsafe { &*(api as *const ffi::PJRT_Api) },
            None => return Err(load_error("GetPjrtApi returned no table".into())),
        };
        let version = &api.pjrt_api_version;
        if version.major_version != 0 || version.minor_version < MIN_API_MINOR {
            return Err(XlaError::ApiVersion {
                path: path.to_path_buf(),
                major: version.major_version,
                minor: version.minor_version,
            });
        }
        let plugin = Arc::new(Plugin { path: path.to_path_buf(), api, _library: library });
        let mut init = args!(PJRT_Plugin_Initialize_Args {});
        call!(&plugin, PJRT_Plugin_Initialize, &mut init)?;
        opened.insert(path.to_path_buf(), plugin.clone());
        Ok(plugin)
    }

    /// Turns a returned `PJRT_Error*` into a result, destroying the error.
    fn check(&self, call: &'static str, error: *mut ffi::PJRT_Error) -> Result<(), XlaError> {
        if error.is_null() {
            return Ok(());
        }
        let mut message_args = args!(PJRT_Error_Message_Args { error: error });
        let message = match self.api.PJRT_Error_Message {
            Some(f) => {
                // SAFETY: `error` is the live error just returned; the message it points to
                // lives until the error is destroyed below, and is copied before that.
                unsafe { f(&mut message_args) };
                if message_args.message.is_null() {
                    String::from("(no message)")
                } else {
                    let bytes = unsafe {
                        std::slice::from_raw_parts(
                            message_args.message as *const u8,
                            message_args.message_size,
                        )
                    };
                    String::from_utf8_lossy(bytes).into_owned()
                }
            }
            None => String::from("(the plugin has no PJRT_Error_Message)"),
        };
        if let Some(destroy) = self.api.PJRT_Error_Destroy {
            let mut destroy_args = args!(PJRT_Error_Destroy_Args { error: error });
            // SAFETY: destroys the error this function owns, once.
            unsafe { destroy(&mut destroy_args) };
        }
        Err(XlaError::Call { call, message })
    }

    /// Waits for an event and destroys it.
    fn await_event(&self, event: *mut ffi::PJRT_Event) -> Result<(), XlaError> {
        if event.is_null() {
            return Ok(());
        }
        let mut wait = args!(PJRT_Event_Await_Args { event: event });
        let waited = call!(self, PJRT_Event_Await, &mut wait);
        let mut destroy = args!(PJRT_Event_Destroy_Args { event: event });
        let destroyed = call!(self, PJRT_Event_Destroy, &mut destroy);
        waited.and(destroyed)
    }
}

/// A PJRT client and the device it runs programs on.
struct Client {
    plugin: Arc<Plugin>,
    client: *mut ffi::PJRT_Client,
    device: *mut ffi::PJRT_Device,
    platform: String,
}

// SAFETY: PJRT clients are thread-safe (see `Plugin`).
unsafe impl Send for Client {}
unsafe impl Sync for Client {}

impl Drop for Client {
    fn drop(&mut self) {
        let mut a = args!(PJRT_Client_Destroy_Args { client: self.client });
        let _ = call!(&self.plugin, PJRT_Client_Destroy, &mut a);
    }
}

/// The element type of an array on an XLA device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum XlaElementType {
    /// 32-bit float.
    F32,
    /// 32-bit signed integer.
    I32,
}

impl XlaElementType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        4
    }

    fn from_pjrt(code: u32) -> Option<XlaElementType> {
        [XlaElementType::F32, XlaElementType::I32].into_iter().find(|t| t.pjrt() == code)
    }

    pub(crate) fn pjrt(self) -> u32 {
        match self {
            XlaElementType::F32 => f32::PJRT_TYPE,
            XlaElementType::I32 => i32::PJRT_TYPE,
        }
    }
}

/// The element types Tessera moves to and from XLA devices.
pub trait XlaElement: bytemuck::Pod + Default + Send + Sync + sealed::Sealed {
    /// The PJRT buffer type.
    #[doc(hidden)]
    const PJRT_TYPE: u32;
    /// The element type.
    const TYPE: XlaElementType;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for i32 {}
}

// (The casts are no-ops where bindgen gives C enums the type u32, but not on every target.)
#[allow(clippy::unnecessary_cast)]
impl XlaElement for f32 {
    const PJRT_TYPE: u32 = ffi::PJRT_Buffer_Type_PJRT_Buffer_Type_F32 as u32;
    const TYPE: XlaElementType = XlaElementType::F32;
}

#[allow(clippy::unnecessary_cast)]
impl XlaElement for i32 {
    const PJRT_TYPE: u32 = ffi::PJRT_Buffer_Type_PJRT_Buffer_Type_S32 as u32;
    const TYPE: XlaElementType = XlaElementType::I32;
}

/// One XLA device (the first device of a PJRT plugin's client). Cheap to clone.
#[derive(Clone)]
pub struct XlaDevice {
    client: Arc<Client>,
}

impl std::fmt::Debug for XlaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XlaDevice")
            .field("platform", &self.client.platform)
            .field("plugin", &self.client.plugin.path)
            .finish()
    }
}

impl XlaDevice {
    /// The device of the plugin named by `TESSERA_PJRT_PLUGIN`, or of the CPU plugin that
    /// `scripts/install-deps.sh` installs ([`DEFAULT_PJRT_PLUGIN`]).
    ///
    /// # Errors
    /// As [`XlaDevice::open`].
    pub fn open_default() -> Result<Self, XlaError> {
        Self::open(&Self::default_plugin())
    }

    /// The plugin named by `TESSERA_PJRT_PLUGIN`, else [`DEFAULT_PJRT_PLUGIN`].
    pub(crate) fn default_plugin() -> PathBuf {
        std::env::var_os("TESSERA_PJRT_PLUGIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_PJRT_PLUGIN))
    }

    /// Loads and initializes the plugin at `plugin` without making a client (tens of
    /// milliseconds, where a client of the CPU plugin takes a quarter of a second), and
    /// returns its PJRT C API version: what a node process checks before it reports the
    /// plugin to its head.
    ///
    /// # Errors
    /// [`XlaError::PluginNotFound`], [`XlaError::PluginLoad`] or [`XlaError::ApiVersion`].
    pub(crate) fn probe(plugin: &Path) -> Result<(i32, i32), XlaError> {
        let plugin = Plugin::open(plugin)?;
        let version = &plugin.api.pjrt_api_version;
        Ok((version.major_version, version.minor_version))
    }

    /// Whether `buffer` belongs to this device's client.
    pub(crate) fn holds(&self, buffer: &XlaBuffer) -> bool {
        Arc::ptr_eq(&self.client, &buffer.client)
    }

    /// Whether `self` and `other` are handles to the same client (one opened device and
    /// its clones, or an [`XlaActor`](crate::XlaActor)'s device).
    pub fn shares_client(&self, other: &XlaDevice) -> bool {
        Arc::ptr_eq(&self.client, &other.client)
    }

    /// Loads the PJRT plugin at `plugin` (once per process), creates a client and takes its
    /// first addressable device.
    ///
    /// Each call makes a client of its own. In a process that also uses an
    /// [`XlaActor`](crate::XlaActor), build executors and trainers on
    /// [`XlaActor::device`](crate::XlaActor::device) instead: one client per device. (A
    /// GPU plugin's client reserves device memory for itself, by default most of it, so a
    /// second client of the same GPU may not fit.)
    ///
    /// # Errors
    /// [`XlaError::PluginNotFound`], [`XlaError::PluginLoad`] or [`XlaError::ApiVersion`]
    /// for a missing or unusable plugin; [`XlaError::Call`] if the client cannot be made;
    /// [`XlaError::NoDevice`].
    pub fn open(plugin: &Path) -> Result<Self, XlaError> {
        let plugin = Plugin::open(plugin)?;
        let mut create = args!(PJRT_Client_Create_Args {});
        call!(&plugin, PJRT_Client_Create, &mut create)?;
        let client = create.client;
        let mut name = args!(PJRT_Client_PlatformName_Args { client: client });
        let platform = match call!(&plugin, PJRT_Client_PlatformName, &mut name) {
            // SAFETY: the name lives as long as the client; it is copied here.
            Ok(()) if !name.platform_name.is_null() => String::from_utf8_lossy(unsafe {
                std::slice::from_raw_parts(name.platform_name as *const u8, name.platform_name_size)
            })
            .into_owned(),
            _ => String::from("unknown"),
        };
        let mut client = Client { plugin: plugin.clone(), client, device: null_mut(), platform };
        let mut devices = args!(PJRT_Client_AddressableDevices_Args { client: client.client });
        call!(&plugin, PJRT_Client_AddressableDevices, &mut devices)?;
        if devices.num_addressable_devices == 0 || devices.addressable_devices.is_null() {
            return Err(XlaError::NoDevice(plugin.path.display().to_string()));
        }
        // SAFETY: the plugin returned a non-empty array of devices owned by the client.
        client.device = unsafe { *devices.addressable_devices };
        Ok(XlaDevice { client: Arc::new(client) })
    }

    /// The platform's name (e.g. "cpu", "cuda").
    pub fn platform(&self) -> &str {
        &self.client.platform
    }

    /// Compiles a StableHLO module (MLIR text) whose `main` function the executable runs.
    ///
    /// # Errors
    /// [`XlaError::Call`] with the compiler's message if the program does not compile.
    pub fn compile(&self, stablehlo: &str) -> Result<XlaExecutable, XlaError> {
        let plugin = &self.client.plugin;
        let mut code = stablehlo.as_bytes().to_vec();
        let format = b"mlir";
        let program = args!(PJRT_Program {
            code: code.as_mut_ptr() as *mut _,
            code_size: code.len(),
            format: format.as_ptr() as *const _,
            format_size: format.len(),
        });
        let mut compile = args!(PJRT_Client_Compile_Args {
            client: self.client.client,
            program: &program,
            compile_options: COMPILE_OPTIONS.as_ptr() as *const _,
            compile_options_size: COMPILE_OPTIONS.len(),
        });
        call!(plugin, PJRT_Client_Compile, &mut compile)?;
        let mut executable = XlaExecutable {
            client: self.client.clone(),
            loaded: compile.executable,
            outputs: 0,
            parameters: main_parameters(stablehlo),
        };
        let mut get =
            args!(PJRT_LoadedExecutable_GetExecutable_Args { loaded_executable: executable.loaded });
        call!(plugin, PJRT_LoadedExecutable_GetExecutable, &mut get)?;
        let mut count = args!(PJRT_Executable_NumOutputs_Args { executable: get.executable });
        let counted = call!(plugin, PJRT_Executable_NumOutputs, &mut count);
        let mut destroy = args!(PJRT_Executable_Destroy_Args { executable: get.executable });
        call!(plugin, PJRT_Executable_Destroy, &mut destroy)?;
        counted?;
        executable.outputs = count.num_outputs;
        Ok(executable)
    }

    /// Copies host data to the device as an array of shape `dims`.
    ///
    /// # Errors
    /// [`XlaError::Length`] if `data` does not have the shape's element count;
    /// [`XlaError::Call`].
    pub fn upload<T: XlaElement>(&self, data: &[T], dims: &[usize]) -> Result<XlaBuffer, XlaError> {
        let expected: usize = dims.iter().product();
        if expected != data.len() {
            return Err(XlaError::Length {
                what: format!("upload of shape {dims:?}"),
                expected,
                got: data.len(),
            });
        }
        let dims: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
        let plugin = &self.client.plugin;
        let mut a = args!(PJRT_Client_BufferFromHostBuffer_Args {
            client: self.client.client,
            data: data.as_ptr() as *const c_void,
            type_: T::PJRT_TYPE as _,
            dims: dims.as_ptr(),
            num_dims: dims.len(),
            host_buffer_semantics:
                ffi::PJRT_HostBufferSemantics_PJRT_HostBufferSemantics_kImmutableOnlyDuringCall as _,
            device: self.client.device,
        });
        call!(plugin, PJRT_Client_BufferFromHostBuffer, &mut a)?;
        let buffer = XlaBuffer { client: self.client.clone(), buffer: a.buffer };
        // The host data may be reused once this event fires.
        plugin.await_event(a.done_with_host_buffer)?;
        Ok(buffer)
    }
}

/// A compiled program, ready to run on its device.
pub struct XlaExecutable {
    client: Arc<Client>,
    loaded: *mut ffi::PJRT_LoadedExecutable,
    outputs: usize,
    /// `main`'s parameters, where its signature could be read from the program text.
    parameters: Option<Vec<Parameter>>,
}

/// A parameter of a program's `main`, as its signature declares it.
#[derive(Debug, Clone, PartialEq)]
struct Parameter {
    /// The element type as written (`f32`, `i32`, `bf16`, ...).
    element: String,
    /// The dimensions; `None` where one is dynamic (`?`).
    dims: Option<Vec<usize>>,
}

/// The parameters of `func.func @main(...)` in a StableHLO module's text, if it declares
/// `main` in the pretty form with tensor parameters; `None` where it cannot tell (then the
/// plugin's own checks are all there is: the CPU plugin checks shapes, not element types).
fn main_parameters(stablehlo: &str) -> Option<Vec<Parameter>> {
    let start = stablehlo.find("@main(")? + "@main(".len();
    // The argument list, up to its closing parenthesis.
    let mut depth = 0_i32;
    let mut end = None;
    for (i, c) in stablehlo[start..].char_indices() {
        match c {
            '(' | '<' | '{' | '[' => depth += 1,
            ')' if depth == 0 => {
                end = Some(start + i);
                break;
            }
            ')' | '>' | '}' | ']' => depth -= 1,
            _ => {}
        }
    }
    let arguments = &stablehlo[start..end?];
    let mut parameters = Vec::new();
    let mut rest = arguments;
    while let Some(at) = rest.find(':') {
        rest = rest[at + 1..].trim_start();
        let body = rest.strip_prefix("tensor<")?;
        let close = body.find('>')?;
        let spec = body[..close].split(',').next()?.trim();
        let mut parts: Vec<&str> = spec.split('x').collect();
        let element = parts.pop()?.trim().to_string();
        let dims = parts.iter().map(|d| d.trim().parse::<usize>().ok()).collect::<Option<Vec<_>>>();
        parameters.push(Parameter { element, dims });
        // Skip this parameter's attributes, up to the next one.
        rest = match body[close..].find('%') {
            Some(next) => &body[close + next..],
            None => "",
        };
    }
    Some(parameters)
}

/// The name `main`'s signature gives an element type.
fn element_name(element: XlaElementType) -> &'static str {
    match element {
        XlaElementType::F32 => "f32",
        XlaElementType::I32 => "i32",
    }
}

// SAFETY: see `Plugin`.
unsafe impl Send for XlaExecutable {}
unsafe impl Sync for XlaExecutable {}

impl std::fmt::Debug for XlaExecutable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XlaExecutable").field("outputs", &self.outputs).finish()
    }
}

impl Drop for XlaExecutable {
    fn drop(&mut self) {
        let mut a = args!(PJRT_LoadedExecutable_Destroy_Args { executable: self.loaded });
        let _ = call!(&self.client.plugin, PJRT_LoadedExecutable_Destroy, &mut a);
    }
}

impl XlaExecutable {
    /// The number of arrays a run returns.
    pub fn outputs(&self) -> usize {
        self.outputs
    }

    /// Checks `args` against `main`'s signature, where it is known: their number, element
    /// types and shapes (a plugin may take an f32 array for an i32 parameter and read its
    /// bits as integers).
    fn check_arguments(&self, args: &[&XlaBuffer]) -> Result<(), XlaError> {
        let Some(parameters) = &self.parameters else { return Ok(()) };
        if parameters.len() != args.len() {
            return Err(XlaError::ArgumentCount { expected: parameters.len(), got: args.len() });
        }
        for (argument, (parameter, buffer)) in parameters.iter().zip(args).enumerate() {
            let element = element_name(buffer.element_type()?);
            if parameter.element != element {
                let message = format!("main declares {}, the array holds {element}", parameter.element);
                return Err(XlaError::Argument { argument, message });
            }
            let dims = buffer.dims()?;
            if parameter.dims.as_ref().is_some_and(|declared| *declared != dims) {
                let message = format!("main declares shape {:?}, the array has {dims:?}", parameter.dims);
                return Err(XlaError::Argument { argument, message });
            }
        }
        Ok(())
    }

    /// Runs the program on `args` (in the order of `main`'s parameters) and returns its
    /// results, still on the device.
    ///
    /// # Errors
    /// [`XlaError::ForeignBuffer`] for an argument of another client (another
    /// [`XlaDevice::open`]); [`XlaError::Call`] (e.g. an argument of the wrong shape).
    pub fn run(&self, args: &[&XlaBuffer]) -> Result<Vec<XlaBuffer>, XlaError> {
        if let Some(argument) = args.iter().position(|b| !Arc::ptr_eq(&b.client, &self.client)) {
            return Err(XlaError::ForeignBuffer { argument });
        }
        self.check_arguments(args)?;
        let plugin = &self.client.plugin;
        let arg_list: Vec<*mut ffi::PJRT_Buffer> = args.iter().map(|b| b.buffer).collect();
        let arg_lists = [arg_list.as_ptr()];
        let mut outputs: Vec<*mut ffi::PJRT_Buffer> = vec![null_mut(); self.outputs];
        let output_lists = [outputs.as_mut_ptr()];
        let mut complete: [*mut ffi::PJRT_Event; 1] = [null_mut()];
        let mut options = args!(PJRT_ExecuteOptions {});
        let mut a = args!(PJRT_LoadedExecutable_Execute_Args {
            executable: self.loaded,
            options: &mut options,
            argument_lists: arg_lists.as_ptr(),
            num_devices: 1,
            num_args: arg_list.len(),
            output_lists: output_lists.as_ptr(),
            device_complete_events: complete.as_mut_ptr(),
        });
        call!(plugin, PJRT_LoadedExecutable_Execute, &mut a)?;
        // Own the outputs first, so that they are freed whatever happens next.
        let results: Vec<XlaBuffer> =
            outputs.into_iter().map(|buffer| XlaBuffer { client: self.client.clone(), buffer }).collect();
        plugin.await_event(complete[0])?;
        Ok(results)
    }
}

/// An array on an XLA device.
pub struct XlaBuffer {
    client: Arc<Client>,
    buffer: *mut ffi::PJRT_Buffer,
}

// SAFETY: see `Plugin`.
unsafe impl Send for XlaBuffer {}
unsafe impl Sync for XlaBuffer {}

impl std::fmt::Debug for XlaBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XlaBuffer").finish_non_exhaustive()
    }
}

impl Drop for XlaBuffer {
    fn drop(&mut self) {
        if !self.buffer.is_null() {
            let mut a = args!(PJRT_Buffer_Destroy_Args { buffer: self.buffer });
            let _ = call!(&self.client.plugin, PJRT_Buffer_Destroy, &mut a);
        }
    }
}

impl XlaBuffer {
    /// The array's shape.
    ///
    /// # Errors
    /// [`XlaError::Call`].
    pub fn dims(&self) -> Result<Vec<usize>, XlaError> {
        let mut a = args!(PJRT_Buffer_Dimensions_Args { buffer: self.buffer });
        call!(&self.client.plugin, PJRT_Buffer_Dimensions, &mut a)?;
        if a.num_dims == 0 || a.dims.is_null() {
            return Ok(Vec::new());
        }
        // SAFETY: the plugin returned `num_dims` dimensions owned by the buffer.
        let dims = unsafe { std::slice::from_raw_parts(a.dims, a.num_dims) };
        Ok(dims.iter().map(|&d| d.max(0) as usize).collect())
    }

    /// The element type.
    ///
    /// # Errors
    /// [`XlaError::UnsupportedType`] for a type other than f32 and i32; [`XlaError::Call`].
    pub fn element_type(&self) -> Result<XlaElementType, XlaError> {
        let mut element = args!(PJRT_Buffer_ElementType_Args { buffer: self.buffer });
        call!(&self.client.plugin, PJRT_Buffer_ElementType, &mut element)?;
        let code = element.type_ as u32;
        XlaElementType::from_pjrt(code).ok_or(XlaError::UnsupportedType(code))
    }

    /// Copies the array to the host into `out`, which must hold exactly its elements.
    ///
    /// # Errors
    /// [`XlaError::Length`] if `out` has another length than the array; [`XlaError::Call`].
    pub fn download_into<T: XlaElement>(&self, out: &mut [T]) -> Result<(), XlaError> {
        let mut element = args!(PJRT_Buffer_ElementType_Args { buffer: self.buffer });
        call!(&self.client.plugin, PJRT_Buffer_ElementType, &mut element)?;
        if element.type_ as u32 != T::PJRT_TYPE {
            return Err(XlaError::ElementType { expected: T::PJRT_TYPE, got: element.type_ as u32 });
        }
        let expected: usize = self.dims()?.iter().product();
        if expected != out.len() {
            return Err(XlaError::Length { what: "download".into(), expected, got: out.len() });
        }
        let mut a = args!(PJRT_Buffer_ToHostBuffer_Args {
            src: self.buffer,
            dst: out.as_mut_ptr() as *mut c_void,
            dst_size: std::mem::size_of_val(out),
        });
        call!(&self.client.plugin, PJRT_Buffer_ToHostBuffer, &mut a)?;
        self.client.plugin.await_event(a.event)
    }

    /// Copies the array to a new host vector.
    ///
    /// # Errors
    /// As [`XlaBuffer::download_into`].
    pub fn download<T: XlaElement>(&self) -> Result<Vec<T>, XlaError> {
        let mut out = vec![T::default(); self.dims()?.iter().product()];
        self.download_into(&mut out)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_plugin_is_a_clear_error() {
        let err = XlaDevice::open(Path::new("/nonexistent/plugin.so")).unwrap_err();
        assert!(matches!(err, XlaError::PluginNotFound { .. }), "{err}");
        assert!(err.to_string().contains("install-deps"), "{err}");
    }

    #[test]
    fn a_file_that_is_not_a_plugin_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("tessera-xla-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("not-a-plugin.so");
        std::fs::write(&path, b"not an ELF file").unwrap();
        let err = XlaDevice::open(&path).unwrap_err();
        assert!(matches!(err, XlaError::PluginLoad { .. }), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn main_parameters_are_read_from_the_signature() {
        let param = |element: &str, dims: Option<Vec<usize>>| Parameter { element: element.into(), dims };
        let text =
            "module {\n func.func public @main(%a: tensor<2x3xf32> {mhlo.sharding = \"{replicated}\"}, \
                    %b: tensor<i32>, %c: tensor<?x4xbf16>) -> (tensor<2x3xf32>) {";
        assert_eq!(
            main_parameters(text),
            Some(vec![param("f32", Some(vec![2, 3])), param("i32", Some(vec![])), param("bf16", None)])
        );
        assert_eq!(main_parameters("func.func @main() -> tensor<f32> {"), Some(vec![]));
        // Forms it cannot read leave the checks to the plugin.
        assert_eq!(
            main_parameters("\"func.func\"() ({ ^bb0(%a: tensor<2xf32>): }) {sym_name = \"main\"}"),
            None
        );
        assert_eq!(main_parameters("func.func @main(%t: tuple<tensor<2xf32>>) {"), None);
    }

    #[test]
    fn a_program_runs_on_the_cpu_plugin() {
        let device = XlaDevice::open_default().unwrap();
        let program = r#"
func.func @main(%a: tensor<2x2xf32>, %b: tensor<2x2xf32>) -> (tensor<2x2xf32>, tensor<i32>) {
  %0 = "stablehlo.dot_general"(%a, %b) {dot_dimension_numbers = #stablehlo.dot<lhs_contracting_dimensions = [1], rhs_contracting_dimensions = [0]>} : (tensor<2x2xf32>, tensor<2x2xf32>) -> tensor<2x2xf32>
  %1 = "stablehlo.constant"() {value = dense<7> : tensor<i32>} : () -> tensor<i32>
  return %0, %1 : tensor<2x2xf32>, tensor<i32>
}
"#;
        let exe = device.compile(program).unwrap();
        assert_eq!(exe.outputs(), 2);
        let a = device.upload(&[1.0f32, 2.0, 3.0, 4.0], &[2, 2]).unwrap();
        let b = device.upload(&[5.0f32, 6.0, 7.0, 8.0], &[2, 2]).unwrap();
        let out = exe.run(&[&a, &b]).unwrap();
        assert_eq!(out[0].download::<f32>().unwrap(), vec![19.0, 22.0, 43.0, 50.0]);
        assert_eq!(out[1].download::<i32>().unwrap(), vec![7]);
        let wrong = out[1].download::<f32>().unwrap_err();
        assert!(matches!(wrong, XlaError::ElementType { .. }), "{wrong}");
        let err = device.compile("func.func @main( not mlir").unwrap_err();
        assert!(matches!(err, XlaError::Call { call: "PJRT_Client_Compile", .. }), "{err}");
        let short = device.upload(&[1.0f32], &[2, 2]).unwrap_err();
        assert!(matches!(short, XlaError::Length { .. }), "{short}");
        // Arguments that `main` does not declare are refused before the plugin sees them.
        let ints = device.upload(&[1i32, 2, 3, 4], &[2, 2]).unwrap();
        let err = exe.run(&[&a, &ints]).unwrap_err();
        assert!(matches!(err, XlaError::Argument { argument: 1, .. }), "{err}");
        assert!(err.to_string().contains("main declares f32, the array holds i32"), "{err}");
        let row = device.upload(&[1.0f32, 2.0], &[1, 2]).unwrap();
        let err = exe.run(&[&row, &b]).unwrap_err();
        assert!(matches!(err, XlaError::Argument { argument: 0, .. }), "{err}");
        let err = exe.run(&[&a]).unwrap_err();
        assert!(matches!(err, XlaError::ArgumentCount { expected: 2, got: 1 }), "{err}");
        let other = XlaDevice::open_default().unwrap();
        let theirs = other.upload(&[1.0f32; 4], &[2, 2]).unwrap();
        let err = exe.run(&[&a, &theirs]).unwrap_err();
        assert!(matches!(err, XlaError::ForeignBuffer { argument: 1 }), "{err}");
    }
}
