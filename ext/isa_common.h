// Instruction-set codes shared with sedac_core/kernels.py (ISA_CODES), and which of them this build compiled: the
// build passes -DSEDAC_HAVE_<ISA> for every per-ISA object it built. Used by both CPU extensions (sedac_cpu.cpp,
// skinny_gemm.cpp), each of which registers compiled_isas() as an op so Python can pick the best available.
#pragma once

#include <cstdint>
#include <vector>

namespace sedac {

constexpr int64_t kIsaDefault = 0;
constexpr int64_t kIsaAvx2 = 1;
constexpr int64_t kIsaAvx512 = 2;

inline std::vector<int64_t> compiled_isas() {
  std::vector<int64_t> out{kIsaDefault};
#ifdef SEDAC_HAVE_AVX2
  out.push_back(kIsaAvx2);
#endif
#ifdef SEDAC_HAVE_AVX512
  out.push_back(kIsaAvx512);
#endif
  return out;
}

}  // namespace sedac
