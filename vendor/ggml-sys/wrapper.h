// The ggml headers asagi-gguf binds. They come from the install prefix of llama-cpp-sys-2's CMake build.
#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "ggml-rpc.h"
#include "gguf.h"
#ifdef ASAGI_GGML_CUDA
#include "ggml-cuda.h"
#endif
#ifdef ASAGI_GGML_METAL
#include "ggml-metal.h"
#endif
#ifdef ASAGI_GGML_VULKAN
#include "ggml-vulkan.h"
#endif
