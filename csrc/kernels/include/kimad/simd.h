// Guarded native SIMD: hot loops are compiled once per instruction set and the best clone is
// picked at load time (GCC function multi-versioning), so one binary uses AVX-512/AVX2 where
// the CPU has them and still runs on any x86-64 CPU.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__CUDACC__) && \
    !defined(KIMAD_NO_TARGET_CLONES) && !defined(__SANITIZE_ADDRESS__)
#define KIMAD_SIMD_CLONES __attribute__((target_clones("default", "avx2", "avx512f")))
#else
#define KIMAD_SIMD_CLONES
#endif
