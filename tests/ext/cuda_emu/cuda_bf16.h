// Emulator shim (see cuda_emu.h): __nv_bfloat16 as the upper 16 bits of a float.
#pragma once
#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t out = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &out, sizeof f);
  return f;
}
