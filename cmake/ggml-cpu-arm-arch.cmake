# Included by CMake after every project() of llama.cpp's build (CMAKE_PROJECT_INCLUDE, set in
# .cargo/aarch64-linux.toml). llama-cpp-sys-2 =0.1.161 defines GGML_CPU_ARM_ARCH=armv8-a for every non-native
# aarch64 Linux build, after (and so over) the value forwarded from the environment; ggml-cpu then compiles its
# kernels without dotprod/fp16. Restore the value the user asked for, e.g. armv8.2-a+dotprod+fp16 for a Raspberry Pi 5.
if(DEFINED ENV{GGML_CPU_ARM_ARCH} AND NOT "$ENV{GGML_CPU_ARM_ARCH}" STREQUAL "")
    set(GGML_CPU_ARM_ARCH "$ENV{GGML_CPU_ARM_ARCH}" CACHE STRING "ggml-cpu -march for ARM (from the environment)" FORCE)
endif()
