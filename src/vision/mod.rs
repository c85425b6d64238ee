//! The vision path: SigLIP encoder + projector from an mmproj GGUF, and image encoding.

mod encoder;
mod hparams;
mod model;

pub use encoder::{ImageEmbedding, VisionEncoder};
pub use hparams::{Activation, VisionHParams};
pub use model::{is_matmul_weight, VisionModel};
