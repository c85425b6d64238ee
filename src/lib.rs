//! asagi-gguf: converter and ggml runtime for the Asagi Japanese vision-language models.
//!
//! The safe ggml layer is the `ggml` crate (vendor/ggml), re-exported here; the converter library is the
//! `asagi-convert` crate (convert/).

pub use ggml;

pub mod bench;
pub mod bench_cmd;
pub mod cache;
pub mod chat;
pub mod chat_cmd;
pub mod convert_cmd;
pub mod demo_cmd;
pub mod devices;
pub mod encode_cmd;
pub mod fuzz;
pub mod generate;
pub mod info;
pub mod interrupt;
pub mod llm;
pub mod load;
pub mod memory;
pub mod multimodal;
pub mod preprocess;
pub mod progress;
pub mod rpc_server_cmd;
pub mod run_cmd;
pub mod sampling;
pub mod serve;
pub mod synth;
pub mod tokenize_cmd;
pub mod tokenizer;
pub mod vision;
pub mod weights;
