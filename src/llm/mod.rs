//! The language model (llm-jp-3, llama architecture) on ggml: hyperparameters, weights, graph, KV cache and
//! decoding sessions.

mod hparams;
mod kv_cache;
mod model;
mod session;

pub use hparams::HParams;
pub use kv_cache::{KvCache, MAX_SEQ};
pub use model::{block_tensor_names, is_matmul_weight, offloaded_tensors, LlamaModel};
pub use session::{Batch, Input, Session, SessionParams};
