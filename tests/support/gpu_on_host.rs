//! The host GPU: a stand-in for the CUDA driver, cuBLAS, cuBLASLt, cuSPARSE and NCCL
//! (`TESSERA_HOST_GPU_DEVICES` devices, default 1; NCCL ranks in any processes, through
//! shared memory) that runs Tessera's GPU code paths on the CPU, so that the GPU tests' own
//! assertions run on machines without a GPU: every kernel (compiled as C++, from the same
//! sources NVRTC compiles), every copy, product and launch the executor and the trainers
//! queue, in their order, and streams that lag behind the host (see `gpu_on_host_api.cpp`).
//! What it cannot show: the real driver's and libraries' behaviour, timing, and anything
//! sized by the hardware;
//! `scripts/gpu-check.sh` runs the same tests on a GPU for that.
//!
//! `build` writes the C++ (`gpu_on_host_shim.h`, the kernels' prelude and sources, a
//! parameter-unpacking entry per kernel, `gpu_on_host_api.cpp`), compiles it into a shared
//! library and names it after each of those libraries in a directory, to put first on a
//! child process's library path.
// Shared by tests/gpu.rs (which builds the host GPU) and tests/kernels_on_host.rs (which
// reads kernel parameters the same way): each uses part of it.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

use tessera::{KERNELS, KERNEL_PRELUDE};

/// The text between the parentheses of kernel `name`'s definition.
pub fn parameter_list<'k>(name: &str, kernel: &'k str) -> &'k str {
    let head = format!("void {name}(");
    let start =
        kernel.find(&head).unwrap_or_else(|| panic!("{name}: no `{head}` in its source")) + head.len();
    &kernel[start..start + kernel[start..].find(')').expect("parameter list ends")]
}

/// A parameter's type and name: `const float* __restrict__ x` is `("const float* __restrict__", "x")`.
pub fn split_parameter(param: &str) -> (&str, &str) {
    let param = param.trim();
    let name_at = param.rfind(|c: char| !(c.is_alphanumeric() || c == '_')).map_or(0, |at| at + 1);
    (param[..name_at].trim_end(), &param[name_at..])
}

/// The translation unit: shim, prelude, kernels, the kernel table, the libraries.
fn source() -> String {
    let support = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support");
    let mut source = format!("#include \"{support}/gpu_on_host_shim.h\"\n{KERNEL_PRELUDE}\n");
    let mut table = String::from("static const tessera_kernel tessera_kernels[] = {\n");
    for (name, kernel) in KERNELS {
        source.push_str(kernel);
        source.push('\n');
        let types: Vec<String> = parameter_list(name, kernel)
            .split(',')
            .map(|param| split_parameter(param).0.replace("__restrict__", "").trim().to_string())
            .collect();
        // The launch passes a pointer to each argument's value.
        let args: Vec<String> = types.iter().enumerate().map(|(i, t)| format!("*({t}*)p[{i}]")).collect();
        source.push_str(&format!(
            "static void tessera_run_{name}(void** p) {{ {name}({}); }}\n",
            args.join(", ")
        ));
        // Each argument's size, for a launch queued on a stream to copy the values.
        let sizes: Vec<String> = types.iter().map(|t| format!("sizeof({t})")).collect();
        source.push_str(&format!("static const size_t tessera_sizes_{name}[] = {{{}}};\n", sizes.join(", ")));
        // Block-synchronous: a barrier of its own, or a prelude block reduction's.
        let syncs = kernel.contains("__syncthreads") || kernel.contains("tessera_block_");
        table.push_str(&format!(
            "    {{\"{name}\", tessera_run_{name}, {syncs}, {}, tessera_sizes_{name}}},\n",
            sizes.len()
        ));
    }
    table.push_str("};\nstatic const size_t tessera_kernel_count = sizeof tessera_kernels / sizeof tessera_kernels[0];\n");
    source.push_str(&table);
    source.push_str(&format!("#include \"{support}/gpu_on_host_api.cpp\"\n"));
    source
}

/// Builds the host GPU into `dir` (one library under the five libraries' names).
///
/// # Errors
/// The compiler's failure to start, as text; a compile error panics (the sources are ours).
pub fn build(dir: &Path) -> Result<(), String> {
    let (source, library) = (dir.join("gpu_on_host.cpp"), dir.join("libtessera_host_gpu.so"));
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    std::fs::write(&source, self::source()).map_err(|e| format!("cannot write {}: {e}", source.display()))?;
    let compiler = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let output = Command::new(&compiler)
        .args(["-std=c++20", "-O2", "-shared", "-fPIC", "-o"])
        .arg(&library)
        .arg(&source)
        .output()
        .map_err(|e| format!("`{compiler}` does not run: {e}"))?;
    assert!(
        output.status.success(),
        "the host GPU does not compile:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for name in ["libcuda.so", "libcublas.so", "libcublasLt.so", "libcusparse.so", "libnccl.so"] {
        let link = dir.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&library, link).map_err(|e| e.to_string())?;
    }
    Ok(())
}
