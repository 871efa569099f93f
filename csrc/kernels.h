// What the kernel library's translation units share: the operands of a matmul call and of a paged
// attention call, and the kernels of the instruction set in use (decode_kernels.cpp dispatches;
// decode_stack.cpp runs whole transformer blocks on them).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace gptstack {
constexpr int kLanes = 16;                       // output channels per panel
constexpr int kGroupK = 32;                      // K per int4 scale; K is padded to a multiple of it
constexpr int kPairsPerGroup = kGroupK / 2;
constexpr int64_t kMinWeightsPerTask = 1 << 16;  // below this a thread costs more than it saves

enum class Format { Fp32, Bf16, Int8, Int4 };

// One call's operands, as the kernels read them.
struct Call {
  Format format;
  const void* panels;           // packed weights
  const float* group_scales;    // int4: [panels][k_padded / 32][16]
  const float* channel_scale;   // int8: [n_padded], else null
  const float* bias;            // [n_padded] or null
  const void* x;                // [m][x_stride] activations: fp32, or bf16 pairs for vdpbf16ps
  int64_t x_stride;
  int64_t m, k_padded, n, n_padded;
  float* y;                     // [m][n]
};

// One paged_decode_attention call's operands.
struct PagedAttention {
  const float* q;               // [sequences][q_stride], heads * head_dim used per sequence
  int64_t q_stride;
  const void* k_pool;           // [slots][heads][head_dim], fp32 or bf16 (bf16 set)
  const void* v_pool;
  bool bf16;
  const int64_t* key_slots;     // [sequences][max_keys]: the pool slot of each key position
  const int64_t* key_lengths;   // [sequences]: the query sits at position key_lengths[s] - 1
  int64_t sequences, heads, head_dim, max_keys, band_width;
  int64_t visible_keys, most_visible;   // over all sequences: the sum and the largest
  float scale;
  float* out;                   // [sequences][heads][head_dim]
};

// The first key a query at position end - 1 sees: all keys, or the last band_width of them.
inline int64_t visible_begin(int64_t end, int64_t band_width) {
  return band_width > 0 ? std::max<int64_t>(0, end - band_width) : 0;
}

inline float bf16_to_float(uint16_t bits) {
  const uint32_t word = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &word, sizeof f);
  return f;
}

// The kernels of the instruction set in use (the best the CPU has, capped by select_isa).
void linear(const Call& call);
void paged_attention(const PagedAttention& attention);
// True when bf16 weights meet bf16 activations (vdpbf16ps): Call.x is then bf16 pairs, x_stride k_padded / 2.
bool bf16_dot_active();
// True when int8 weights meet int8 activations (integer dot products; int8_dot_kernels.h).
bool int8_dot_active();

}  // namespace gptstack
