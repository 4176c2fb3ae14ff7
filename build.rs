//! Build script: generated bindings for the optional native parts.
//! - Feature `xla`: the PJRT C API, from the header that the PJRT plugin package ships
//!   (`pjrt_c_api.h`). The header is not committed: `scripts/install-deps.sh` fetches the
//!   plugin wheel from PyPI into /opt/tessera-pjrt, or `TESSERA_PJRT_INCLUDE` names the
//!   folder that holds the header.
//! - Feature `ucx`: UCX's UCP API, from the system's headers (Debian's `libucx-dev`; or
//!   `TESSERA_UCX_PREFIX` names an install prefix), linked against its `libucp`/`libucs`.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "xla")]
    pjrt::generate();
    #[cfg(feature = "ucx")]
    ucx::generate();
}

/// Runs bindgen over `header` with the settings both bindings share (C enums as constants,
/// no layout tests or comments) and writes the result to `OUT_DIR/file`.
#[cfg(any(feature = "xla", feature = "ucx"))]
fn write_bindings(builder: bindgen::Builder, header: &std::path::Path, file: &str) {
    let bindings = builder
        .header(header.to_string_lossy())
        .default_enum_style(bindgen::EnumVariation::Consts)
        .derive_default(false)
        .layout_tests(false)
        .generate_comments(false)
        .generate()
        .unwrap_or_else(|e| panic!("bindgen over {}: {e}", header.display()));
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join(file);
    bindings.write_to_file(&out).unwrap_or_else(|e| panic!("writing {}: {e}", out.display()));
}

#[cfg(feature = "ucx")]
mod ucx {
    use std::path::PathBuf;

    pub fn generate() {
        println!("cargo:rerun-if-env-changed=TESSERA_UCX_PREFIX");
        let prefix = std::env::var_os("TESSERA_UCX_PREFIX").map(PathBuf::from);
        let include = prefix.as_ref().map_or_else(|| PathBuf::from("/usr/include"), |p| p.join("include"));
        let header = include.join("ucp/api/ucp.h");
        if !header.is_file() {
            panic!(
                "feature `ucx` needs UCX's headers, and {} is not there: run scripts/install-deps.sh \
                 (it installs Debian's libucx-dev), or set TESSERA_UCX_PREFIX to a UCX install prefix",
                header.display()
            );
        }
        if let Some(prefix) = &prefix {
            println!("cargo:rustc-link-search=native={}", prefix.join("lib").display());
        }
        println!("cargo:rustc-link-lib=ucp");
        println!("cargo:rustc-link-lib=ucs");
        println!("cargo:rerun-if-changed={}", header.display());
        let builder = bindgen::Builder::default()
            .clang_arg(format!("-I{}", include.display()))
            .allowlist_function("ucp_.*|ucs_status_string")
            .allowlist_type("ucp_.*|ucs_status_t|ucs_status_ptr_t")
            .allowlist_var("UCP_.*|UCS_.*");
        super::write_bindings(builder, &header, "ucx.rs");
    }
}

#[cfg(feature = "xla")]
mod pjrt {
    use std::path::PathBuf;

    /// Where `scripts/install-deps.sh` unpacks the CPU plugin's wheel.
    const DEFAULT_INCLUDE: &str = "/opt/tessera-pjrt/xla_plugins/xla_cpu_pjrt/include";

    pub fn generate() {
        println!("cargo:rerun-if-env-changed=TESSERA_PJRT_INCLUDE");
        let include = std::env::var_os("TESSERA_PJRT_INCLUDE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_INCLUDE));
        let header = include.join("pjrt_c_api.h");
        if !header.is_file() {
            panic!(
                "feature `xla` needs the PJRT C API header, and {} is not there: run \
                 scripts/install-deps.sh (it unpacks PyPI's xla-cpu-pjrt into /opt/tessera-pjrt), \
                 or set TESSERA_PJRT_INCLUDE to the folder holding pjrt_c_api.h",
                header.display()
            );
        }
        println!("cargo:rerun-if-changed={}", header.display());
        let builder = bindgen::Builder::default().allowlist_item("PJRT_.*").allowlist_item("GetPjrtApi");
        super::write_bindings(builder, &header, "pjrt.rs");
    }
}
