//! The Asagi converter library (Hugging Face checkpoint to GGUF). Filled by the converter issue.
