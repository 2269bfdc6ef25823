// Runs ext/stats_cuda_kernel.cu (rewritten by the test: `k<<<g, b, s, st>>>(...)` becomes
// `::cuda_emu::launch(k, g, b, s, st, ...)`) on the emulator, on rows read from a file.
//   emu_main IN OUT
// IN:  int32 dtype (0 f32, 1 f16, 2 bf16), int32 misalign (bytes the row data sits past a 64-byte boundary),
//      int64 rows, int64 V, float tau_low, float tau_high, then the rows' raw bytes.
// OUT: float32 entropy[rows], varentropy[rows], max_prob[rows], logsumexp[rows]; int64 argmax[rows], decision[rows]
// With -fsanitize=address the bytes after the rows are poisoned, so a read past the row end is reported.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#endif

#include "cuda_runtime.h"
#include "stats_cuda_kernel.h"

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: emu_main IN OUT\n");
    return 2;
  }
  FILE* in = std::fopen(argv[1], "rb");
  if (!in) return 2;
  int32_t dtype = 0, misalign = 0;
  int64_t rows = 0, V = 0;
  float lo = 0, hi = 0;
  if (std::fread(&dtype, 4, 1, in) != 1 || std::fread(&misalign, 4, 1, in) != 1 || std::fread(&rows, 8, 1, in) != 1 ||
      std::fread(&V, 8, 1, in) != 1 || std::fread(&lo, 4, 1, in) != 1 || std::fread(&hi, 4, 1, in) != 1)
    return 2;
  const size_t elem = dtype == 0 ? 4 : 2, bytes = static_cast<size_t>(rows * V) * elem;
  // a 64-aligned block; the rows start `misalign` bytes in; what follows them is poisoned (with -fsanitize=address)
  const size_t total = (static_cast<size_t>(misalign) + bytes + 64 + 63) / 64 * 64;
  char* base = static_cast<char*>(std::aligned_alloc(64, total));
  char* data = base + misalign;
#if defined(__SANITIZE_ADDRESS__)
  ASAN_POISON_MEMORY_REGION(data + bytes, total - misalign - bytes);
#endif
  if (std::fread(data, 1, bytes, in) != bytes) return 2;
  std::fclose(in);

  std::vector<float> ent(rows), var(rows), maxp(rows), lse(rows);
  std::vector<int64_t> arg(rows), dec(rows);
  // scratch as the binding allocates it: exactly the bytes asked for (ASan reports a write past them)
  const int64_t scratch_bytes = sedac::token_stats_cuda_scratch_bytes(rows, V);
  char* scratch = scratch_bytes > 0 ? static_cast<char*>(std::malloc(scratch_bytes)) : nullptr;
  const int err = sedac::launch_token_stats_cuda(data, dtype, rows, V, lo, hi, ent.data(), var.data(), maxp.data(),
                                                 lse.data(), arg.data(), dec.data(), scratch, nullptr);
  std::free(scratch);
  if (err != 0) {
    std::fprintf(stderr, "launch error %d: %s\n", err, ::cuda_emu::emu().message.c_str());
    return 3;
  }
  FILE* out = std::fopen(argv[2], "wb");
  if (!out) return 2;
  std::fwrite(ent.data(), 4, rows, out);
  std::fwrite(var.data(), 4, rows, out);
  std::fwrite(maxp.data(), 4, rows, out);
  std::fwrite(lse.data(), 4, rows, out);
  std::fwrite(arg.data(), 8, rows, out);
  std::fwrite(dec.data(), 8, rows, out);
  std::fclose(out);
#if defined(__SANITIZE_ADDRESS__)
  ASAN_UNPOISON_MEMORY_REGION(base, total);
#endif
  std::free(base);
  return 0;
}
