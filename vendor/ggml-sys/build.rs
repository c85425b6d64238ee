//! Generates bindings for the ggml headers installed by llama-cpp-sys-2.
//!
//! llama-cpp-sys-2 (`links = "llama"`) publishes `cargo:ggml_cmake_dir=<prefix>/lib(64)/cmake`, which Cargo hands
//! to this direct dependent as `DEP_LLAMA_GGML_CMAKE_DIR`. The headers are in `<prefix>/include`. This script emits
//! no link directives: the static libraries are linked by llama-cpp-sys-2 itself, so the program has one ggml.

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=wrapper.h");
    println!("cargo:rerun-if-env-changed=DEP_LLAMA_GGML_CMAKE_DIR");

    let cmake_dir = env::var("DEP_LLAMA_GGML_CMAKE_DIR").unwrap_or_else(|_| {
        panic!(
            "DEP_LLAMA_GGML_CMAKE_DIR is not set: llama-cpp-sys-2 did not report where it installed ggml \
             (is the llama-cpp-sys-2 build a system-ggml one?)"
        )
    });
    let include = PathBuf::from(&cmake_dir).join("..").join("..").join("include");
    let include =
        include.canonicalize().unwrap_or_else(|e| panic!("ggml include dir {} not found: {e}", include.display()));
    assert!(include.join("ggml.h").is_file(), "{} has no ggml.h", include.display());
    // The RPC backend (`rpc-server`, `--rpc`) is part of every build: .cargo/config.toml sets GGML_RPC=ON, which
    // llama-cpp-sys-2 hands to CMake. A build without it would fail at the final link, less clearly than here.
    let lib = PathBuf::from(&cmake_dir).join("..");
    let lib = lib.canonicalize().unwrap_or(lib);
    if !["libggml-rpc.a", "ggml-rpc.lib", "libggml-rpc.so", "libggml-rpc.dylib"].iter().any(|f| lib.join(f).is_file()) {
        panic!(
            "llama-cpp-sys-2 built ggml without its RPC backend ({} has no libggml-rpc): build with GGML_RPC=ON in \
             the environment (.cargo/config.toml sets it; a target directory built before that needs \
             `cargo clean -p llama-cpp-sys-2`)",
            lib.display()
        );
    }

    let mut builder = bindgen::Builder::default()
        .header("wrapper.h")
        .clang_arg(format!("-I{}", include.display()))
        .allowlist_function("(ggml|gguf)_.*")
        .allowlist_type("(ggml|gguf)_.*")
        .allowlist_var("(GGML|GGUF|RPC_PROTO)_.*")
        .prepend_enum_name(false)
        .derive_default(true)
        .layout_tests(false)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()));
    for (feature, define) in [
        ("CARGO_FEATURE_CUDA", "ASAGI_GGML_CUDA"),
        ("CARGO_FEATURE_METAL", "ASAGI_GGML_METAL"),
        ("CARGO_FEATURE_VULKAN", "ASAGI_GGML_VULKAN"),
    ] {
        if env::var_os(feature).is_some() {
            builder = builder.clang_arg(format!("-D{define}"));
        }
    }
    let bindings = builder.generate().expect("bindgen failed on the ggml headers");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("bindings.rs");
    bindings.write_to_file(&out).unwrap_or_else(|e| panic!("cannot write {}: {e}", out.display()));
    println!("cargo:include={}", include.display());
}
