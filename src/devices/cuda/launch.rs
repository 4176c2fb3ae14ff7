//! Kernel launches whose arguments are checked against the kernel's C signature when the
//! crate is built: the `launch!` macro, and the compile-time parser of the parameter lists
//! in [`KERNELS`].
//!
//! cudarc pushes each argument's bytes as they are, so an argument of the wrong width (a
//! `usize` for an `unsigned int`, an `f64` for a `float`), a buffer of the wrong element
//! type, a read-only buffer for a parameter the kernel writes, or one argument too many or
//! too few would shift or corrupt every parameter after it, silently, on the GPU only.
//! `launch!` instead fails the build (`cargo build`, `cargo test --no-run`: the check is a
//! constant evaluated when the launch is instantiated) unless the arguments match the
//! kernel's parameters in number, and each in type:
//!
//! | argument                                   | C parameter                              |
//! |--------------------------------------------|------------------------------------------|
//! | `&u32`, `&i32`, `&u64`, `&f32`             | `unsigned int`, `int`, `unsigned long long`, `float` |
//! | `&CudaSlice<T>`, `&CudaView<T>`            | `const T*`                               |
//! | `&mut CudaSlice<T>`, `&mut CudaViewMut<T>` | `T*` or `const T*`                       |
//!
//! for `T` in `f32` (`float`), `f64` (`double`), `i32` (`int`) and `u32` (`unsigned int`).
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchArgs, PushKernelArg};

use super::KERNELS;

/// The C types a kernel argument may be passed as (whitespace does not matter).
pub(crate) trait KernelArg {
    /// The accepted C parameter types.
    const C_TYPES: &'static [&'static str];
}

/// A buffer element type and its C name, as a pointer parameter.
pub(crate) trait KernelElement {
    /// `T*`.
    const POINTER: &'static str;
    /// `const T*`.
    const CONST_POINTER: &'static str;
}

macro_rules! kernel_element {
    ($($rust:ty => $c:literal),* $(,)?) => {$(
        impl KernelElement for $rust {
            const POINTER: &'static str = concat!($c, "*");
            const CONST_POINTER: &'static str = concat!("const ", $c, "*");
        }
    )*};
}
kernel_element!(f32 => "float", f64 => "double", i32 => "int", u32 => "unsigned int");

macro_rules! kernel_scalar {
    ($($rust:ty => $c:literal),* $(,)?) => {$(
        impl KernelArg for &$rust {
            const C_TYPES: &'static [&'static str] = &[$c];
        }
    )*};
}
kernel_scalar!(u32 => "unsigned int", i32 => "int", u64 => "unsigned long long", f32 => "float");

impl<T: KernelElement> KernelArg for &CudaSlice<T> {
    const C_TYPES: &'static [&'static str] = &[T::CONST_POINTER];
}

impl<T: KernelElement> KernelArg for &mut CudaSlice<T> {
    const C_TYPES: &'static [&'static str] = &[T::POINTER, T::CONST_POINTER];
}

impl<T: KernelElement> KernelArg for &CudaView<'_, T> {
    const C_TYPES: &'static [&'static str] = &[T::CONST_POINTER];
}

impl<T: KernelElement> KernelArg for &mut CudaViewMut<'_, T> {
    const C_TYPES: &'static [&'static str] = &[T::POINTER, T::CONST_POINTER];
}

/// A tuple of kernel arguments: their accepted C types, in order, and how to push them.
pub(crate) trait KernelArgs<'a> {
    /// For each argument, the C types it may be passed as.
    const C_TYPES: &'static [&'static [&'static str]];

    /// Pushes the arguments onto a launch, in order.
    fn push_onto(self, builder: &mut LaunchArgs<'a>);
}

macro_rules! kernel_args {
    ($($arg:ident . $index:tt),*) => {
        impl<'a, $($arg: KernelArg),*> KernelArgs<'a> for ($($arg,)*)
        where
            $(LaunchArgs<'a>: PushKernelArg<$arg>,)*
        {
            const C_TYPES: &'static [&'static [&'static str]] = &[$($arg::C_TYPES),*];

            fn push_onto(self, builder: &mut LaunchArgs<'a>) {
                $(builder.arg(self.$index);)*
            }
        }
    };
}
kernel_args!(A0.0);
kernel_args!(A0.0, A1.1);
kernel_args!(A0.0, A1.1, A2.2);
kernel_args!(A0.0, A1.1, A2.2, A3.3);
kernel_args!(A0.0, A1.1, A2.2, A3.3, A4.4);
kernel_args!(A0.0, A1.1, A2.2, A3.3, A4.4, A5.5);
kernel_args!(A0.0, A1.1, A2.2, A3.3, A4.4, A5.5, A6.6);
kernel_args!(A0.0, A1.1, A2.2, A3.3, A4.4, A5.5, A6.6, A7.7);
kernel_args!(A0.0, A1.1, A2.2, A3.3, A4.4, A5.5, A6.6, A7.7, A8.8);
kernel_args!(A0.0, A1.1, A2.2, A3.3, A4.4, A5.5, A6.6, A7.7, A8.8, A9.9);
kernel_args!(A0.0, A1.1, A2.2, A3.3, A4.4, A5.5, A6.6, A7.7, A8.8, A9.9, A10.10);
kernel_args!(A0.0, A1.1, A2.2, A3.3, A4.4, A5.5, A6.6, A7.7, A8.8, A9.9, A10.10, A11.11);
kernel_args!(A0.0, A1.1, A2.2, A3.3, A4.4, A5.5, A6.6, A7.7, A8.8, A9.9, A10.10, A11.11, A12.12);
kernel_args!(A0.0, A1.1, A2.2, A3.3, A4.4, A5.5, A6.6, A7.7, A8.8, A9.9, A10.10, A11.11, A12.12, A13.13);

/// Pushes `args` onto a launch of kernel number `KERNEL` of [`KERNELS`], after checking, when
/// the crate is built, that they match its C signature (see the module's docs).
pub(crate) fn push_checked<'a, const KERNEL: usize, A: KernelArgs<'a>>(
    builder: &mut LaunchArgs<'a>,
    args: A,
) {
    const {
        assert!(
            signature_accepts(KERNEL, A::C_TYPES),
            "kernel arguments do not match the kernel's C parameters in KERNELS (see devices/cuda/launch.rs)"
        )
    };
    args.push_onto(builder);
}

/// Launches kernel `$name` of [`KERNELS`] on `$gpu`'s stream (or, after `on =`, another
/// stream of that GPU) over `$n` elements (a grid-stride launch, [`grid`](super::grid)) or
/// with an explicit `cfg`, with the given arguments, checked against the kernel's C
/// signature when the crate is built; evaluates to `Result<(), DeviceError>` (the `?`
/// inside returns a compile failure's error).
macro_rules! launch {
    ($gpu:expr, $name:literal, on = $stream:expr, cfg = $cfg:expr; $($arg:expr),* $(,)?) => {{
        const KERNEL: usize = $crate::devices::kernel_index($name);
        let gpu: &$crate::devices::Gpu = $gpu;
        let function = gpu.kernel($name)?;
        let stream: &::std::sync::Arc<::cudarc::driver::CudaStream> = $stream;
        let mut builder = stream.launch_builder(&function);
        $crate::devices::push_checked::<KERNEL, _>(&mut builder, ($($arg,)*));
        // SAFETY: every call site passes buffers holding at least the elements the kernel
        // indexes for the sizes it passes (the kernels' sources are in `KERNELS`), and the
        // arguments' types match the kernel's parameters (checked above when the crate is
        // built); the buffers are borrowed until the launch is queued, and the stream
        // orders later uses and frees after it.
        let launched = unsafe { builder.launch($cfg) };
        launched.map(|_| ()).map_err(|e| gpu.driver(e))
    }};
    ($gpu:expr, $name:literal, on = $stream:expr, $n:expr; $($arg:expr),* $(,)?) => {{
        let count: u32 = $n;
        $crate::devices::launch!($gpu, $name, on = $stream, cfg = $crate::devices::grid(count); $($arg),*)
    }};
    ($gpu:expr, $name:literal, cfg = $cfg:expr; $($arg:expr),* $(,)?) => {{
        let gpu: &$crate::devices::Gpu = $gpu;
        $crate::devices::launch!(gpu, $name, on = gpu.stream_ref(), cfg = $cfg; $($arg),*)
    }};
    ($gpu:expr, $name:literal, $n:expr; $($arg:expr),* $(,)?) => {{
        let count: u32 = $n;
        $crate::devices::launch!($gpu, $name, cfg = $crate::devices::grid(count); $($arg),*)
    }};
}
pub(crate) use launch;

/// The index of kernel `name` in [`KERNELS`]. Evaluated in a constant (as `launch!` does), a
/// name that is not there fails the build.
pub(crate) const fn kernel_index(name: &str) -> usize {
    let mut k = 0;
    while k < KERNELS.len() {
        if bytes_equal(KERNELS[k].0.as_bytes(), name.as_bytes()) {
            return k;
        }
        k += 1;
    }
    panic!("launch of a kernel that is not in KERNELS")
}

/// Whether kernel number `kernel` of [`KERNELS`] takes exactly `args.len()` parameters and
/// the C type of parameter `i` is one of `args[i]` (comparing without whitespace). False
/// when the source has no parameter list for the kernel's name.
pub(crate) const fn signature_accepts(kernel: usize, args: &[&[&str]]) -> bool {
    let (name, source) = KERNELS[kernel];
    let source = source.as_bytes();
    let Some(mut start) = parameters_start(source, name.as_bytes()) else { return false };
    let mut index = 0;
    loop {
        let mut end = start;
        while end < source.len() && source[end] != b',' && source[end] != b')' {
            end += 1;
        }
        if end == source.len() || index == args.len() || !type_among(source, start, end, args[index]) {
            return false;
        }
        index += 1;
        if source[end] == b')' {
            return index == args.len();
        }
        start = end + 1;
    }
}

/// The position just after `name(` in `source`, where `name` is a whole identifier.
const fn parameters_start(source: &[u8], name: &[u8]) -> Option<usize> {
    let mut at = 0;
    while at + name.len() < source.len() {
        let whole = at == 0 || !is_identifier(source[at - 1]);
        if whole && source[at + name.len()] == b'(' && prefix_at(source, at, name) {
            return Some(at + name.len() + 1);
        }
        at += 1;
    }
    None
}

/// Whether the parameter `source[start..end]` (a C type then a name) has one of `types`.
const fn type_among(source: &[u8], start: usize, end: usize, types: &[&str]) -> bool {
    // The type is what precedes the trailing identifier (the parameter's name).
    let mut type_end = end;
    while type_end > start && source[type_end - 1].is_ascii_whitespace() {
        type_end -= 1;
    }
    let name_end = type_end;
    while type_end > start && is_identifier(source[type_end - 1]) {
        type_end -= 1;
    }
    if type_end == name_end {
        return false;
    }
    let mut t = 0;
    while t < types.len() {
        if equal_ignoring_whitespace(source, start, type_end, types[t].as_bytes()) {
            return true;
        }
        t += 1;
    }
    false
}

/// Whether `source[start..end]` and `other` have the same bytes once whitespace is removed
/// (and `source[start..end]` has any).
const fn equal_ignoring_whitespace(source: &[u8], start: usize, end: usize, other: &[u8]) -> bool {
    let (mut i, mut j, mut any) = (start, 0, false);
    loop {
        while i < end && source[i].is_ascii_whitespace() {
            i += 1;
        }
        while j < other.len() && other[j].is_ascii_whitespace() {
            j += 1;
        }
        match (i < end, j < other.len()) {
            (false, false) => return any,
            (true, true) if source[i] == other[j] => {
                i += 1;
                j += 1;
                any = true;
            }
            _ => return false,
        }
    }
}

const fn prefix_at(source: &[u8], at: usize, prefix: &[u8]) -> bool {
    let mut i = 0;
    while i < prefix.len() {
        if at + i >= source.len() || source[at + i] != prefix[i] {
            return false;
        }
        i += 1;
    }
    true
}

const fn bytes_equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && prefix_at(a, 0, b)
}

const fn is_identifier(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'_'
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parameter types of kernel `name`, parsed at run time the same way.
    fn accepts(name: &str, args: &[&[&str]]) -> bool {
        signature_accepts(kernel_index(name), args)
    }

    #[test]
    fn every_kernel_has_a_parameter_list_of_known_types() {
        const KNOWN: &[&str] = &[
            "unsigned int",
            "int",
            "unsigned long long",
            "float",
            "float*",
            "const float*",
            "int*",
            "const int*",
            "unsigned int*",
            "const unsigned int*",
            "double*",
            "const double*",
        ];
        for (k, (name, _)) in KERNELS.iter().enumerate() {
            // Find the arity: the one n for which "every parameter is a known type" holds.
            let arity = (0..=16).find(|&n| signature_accepts(k, &vec![KNOWN; n]));
            assert!(arity.is_some_and(|n| n > 0), "kernel {name}: parameters not parsed or of unknown type");
        }
    }

    #[test]
    fn a_matching_signature_is_accepted() {
        assert!(accepts("axpy_f32", &[&["float"], &["const float*"], &["float*"], &["unsigned int"]]));
        // Whitespace does not matter, and a writable buffer may go to a const parameter.
        assert!(accepts(
            "axpy_f32",
            &[&["float"], &["float*", "const  float *"], &["float *"], &["unsigned  int"]]
        ));
        assert!(accepts(
            "dropout_f32",
            &[
                &["const float*"],
                &["float*"],
                &["float*"],
                &["unsigned int"],
                &["float"],
                &["unsigned long long"]
            ]
        ));
    }

    #[test]
    fn a_wrong_type_count_or_constness_is_refused() {
        let axpy: [&[&str]; 4] = [&["float"], &["const float*"], &["float*"], &["unsigned int"]];
        let mut wrong_width = axpy;
        wrong_width[3] = &["unsigned long long"];
        assert!(!accepts("axpy_f32", &wrong_width));
        let mut read_only_output = axpy;
        read_only_output[2] = &["const float*"];
        assert!(!accepts("axpy_f32", &read_only_output));
        let mut wrong_element = axpy;
        wrong_element[1] = &["const int*"];
        assert!(!accepts("axpy_f32", &wrong_element));
        assert!(!accepts("axpy_f32", &axpy[..3]));
        let too_many: Vec<&[&str]> = axpy.iter().copied().chain([&["int"][..]]).collect();
        assert!(!accepts("axpy_f32", &too_many));
    }

    #[test]
    fn the_rust_argument_types_map_to_their_c_types() {
        type Slice = CudaSlice<f32>;
        assert_eq!(<&Slice as KernelArg>::C_TYPES, &["const float*"]);
        assert_eq!(<&mut Slice as KernelArg>::C_TYPES, &["float*", "const float*"]);
        assert_eq!(<&CudaView<'static, u32> as KernelArg>::C_TYPES, &["const unsigned int*"]);
        assert_eq!(<&mut CudaViewMut<'static, i32> as KernelArg>::C_TYPES, &["int*", "const int*"]);
        assert_eq!(<&u64 as KernelArg>::C_TYPES, &["unsigned long long"]);
        let args = <(&f32, &Slice, &mut Slice, &u32) as KernelArgs<'static>>::C_TYPES;
        assert!(accepts("axpy_f32", args));
        let swapped = <(&Slice, &f32, &mut Slice, &u32) as KernelArgs<'static>>::C_TYPES;
        assert!(!accepts("axpy_f32", swapped));
    }

    #[test]
    fn a_name_must_be_a_whole_identifier_followed_by_its_parameters() {
        let source = b"void xrelu_f32(int a) {} void relu_f32 (int b)";
        assert_eq!(parameters_start(source, b"relu_f32"), None);
        assert_eq!(parameters_start(b"void relu_f32(int a)", b"relu_f32"), Some(14));
    }
}
