// What the kernel library's translation units share: the operands of a matmul call and of a paged
// attention call, and the kernels of the instruction set in use (decode_kernels.cpp dispatches;
// decode_stack.cpp runs whole transformer blocks on them).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
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

// body(begin, end) over [0, n) in chunks of at least `min_chunk`, handed to torch's threads as each
// comes free rather than split in equal shares up front: a thread the OS preempts (a server's HTTP
// thread, the client on the same cores) then delays only the chunk it holds, not the whole call.
// At one stream through the HTTP server, equal shares cost GPT-2 bf16 decode ~15% of its speed.
template <class Body>
void parallel_chunks(int64_t n, int64_t min_chunk, const Body& body) {
  const int64_t threads = at::get_num_threads();
  const int64_t chunk = std::max<int64_t>({1, min_chunk, n / (threads * 8)});
  const int64_t chunks = (n + chunk - 1) / chunk;
  if (threads == 1 || chunks == 1 || at::in_parallel_region()) return body(0, n);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, chunks), 1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1)) body(c * chunk, std::min(n, (c + 1) * chunk));
  });
}

// The kernels of the instruction set in use (the best the CPU has, capped by select_isa).
void linear(const Call& call);
void paged_attention(const PagedAttention& attention);
// True when bf16 weights meet bf16 activations (vdpbf16ps): Call.x is then bf16 pairs, x_stride k_padded / 2.
bool bf16_dot_active();
// True when int8 weights meet int8 activations (integer dot products; int8_dot_kernels.h).
bool int8_dot_active();

}  // namespace gptstack
