// int8 weights times int8 activations, integer dot products: the int8 matmul on CPUs with an
// instruction for it (AVX512-VNNI vpdpbusd; AVX2 vpmaddubsw + vpmaddwd).
//
// Converting every int8 weight to fp32 for an FMA costs three instructions per 16 weights, which on
// 2 cores bounds batch-1 decode below the memory bandwidth; a dot-product instruction takes 64 (or
// 32) weights at once. So the activations are quantized per row and group of 32 k, as llama.cpp's
// q8_0 does: q = round(x / s), s = max |x| / 127 over the group. A group's int32 sum is scaled by
// its s; the weights' per-channel scale comes last, in store_panel_rows. Each x moves by at most s / 2.
//
// decode_kernels.cpp includes this file, after tile_kernels.h, inside the namespaces of the ISAs
// that have such an instruction, with these primitives for 16 output lanes:
//   IVec, izero(), iadd(IVec, IVec), iadd_offset(IVec, int32_t), to_float(IVec);
//   WQuad load_quad(const int8_t*): four k of 16 lanes, [16][4] bytes, as dot4 wants them;
//   dot4(IVec acc, const WQuad&, int32_t x4): acc + the 4-k dot of each lane with x4's four bytes;
//   kWeightBias: what dot4 adds to each weight (vpdpbusd multiplies unsigned bytes: w + 128),
//   undone with the group's sum of q;
//   kInt8DotRows (activation rows per block) and kInt8DotChains (int32 sums per row, see int8_dot_panel);
//   max_abs32(const float*) and round32(const float* x, float inverse, int8_t* q) -> sum of q: one
//   group of 32 activations (quantize_group's arithmetic, vectorised where the ISA can).
// No include guard on purpose: every ISA needs its own copy.

constexpr int kQuadsPerGroup = kGroupK / 4;
// How far ahead of its reads a panel's stream asks for lines (prefetcht2: into L2, not L1). Each
// thread reads its panels one after another, one sequential stream; on a 2-core EPYC Zen 4 (shared,
// noisy) this took GPT-2's M=1 int8 matmuls (bench/kernels.py) from ~4.8-5.3 to ~4.0-4.7 ms a step,
// where prefetcht0 1 KB ahead on a tile's four interleaved panel streams had been; those streams
// without software prefetch were ~4.1-4.4 ms, prefetcht0 or 4-8 KB ahead on the one stream no better.
constexpr int kPrefetchBytes = 2048;

// q = round(x / s) half away from zero, s = max |x| / 127 over the group of 32; returns s and sets
// *offset = -kWeightBias * sum of q.
inline float quantize_group(const float* x, int8_t* q, int32_t* offset) {
  const float top = max_abs32(x);
  const float inverse = top > 0.0f ? 127.0f / top : 0.0f;
  *offset = -kWeightBias * round32(x, inverse, q);
  return top / 127.0f;
}

// Activations quantized per row and group of 32 k; offset[row][group] = -kWeightBias * sum of q.
struct QuantizedRows {
  std::vector<int8_t> q;       // [m][k_padded]
  std::vector<float> scale;    // [m][groups]
  std::vector<int32_t> offset;
  int64_t k_padded, groups;

  QuantizedRows(const float* x, int64_t m, int64_t k_padded_)
      : q(m * k_padded_), scale(m * (k_padded_ / kGroupK)), offset(m * (k_padded_ / kGroupK)),
        k_padded(k_padded_), groups(k_padded_ / kGroupK) {
    for (int64_t r = 0; r < m; ++r)
      for (int64_t g = 0; g < groups; ++g)
        scale[r * groups + g] = quantize_group(x + r * k_padded + g * kGroupK, q.data() + r * k_padded + g * kGroupK,
                                               &offset[r * groups + g]);
  }

  int32_t quad(int64_t row, int64_t quad_index) const {   // four q of a row as one int32
    int32_t v;
    std::memcpy(&v, q.data() + row * k_padded + quad_index * 4, sizeof v);
    return v;
  }
};

// MR rows against one panel (16 output channels), all of K, streamed front to back. At one row a
// group's sum is split over kInt8DotChains int32 accumulators (quad kq goes to kq % chains) so its dot
// products do not wait on each other; the chains are added (exactly: integers) before the group's one
// conversion to float. More rows are independent chains already, and fewer chains keep the per-group
// additions and conversions (compute-bound at M = 16) down.
template <int MR>
void int8_dot_panel(const Call& c, const QuantizedRows& xq, int64_t panel, int64_t row0) {
  constexpr int kChains = MR == 1 ? kInt8DotChains : std::max(1, kInt8DotChains / (2 * (MR - 1)));   // 4, 2, 1, ...
  static_assert(kQuadsPerGroup % kChains == 0);
  const int64_t quads = c.k_padded / 4;
  const int8_t* p = static_cast<const int8_t*>(c.panels) + panel * quads * kLanes * 4;
  Vec acc[MR];
  for (int i = 0; i < MR; ++i) acc[i] = zero();
  for (int64_t g = 0; g < xq.groups; ++g) {
    IVec sum[MR][kChains];
    for (int i = 0; i < MR; ++i)
      for (int h = 0; h < kChains; ++h) sum[i][h] = izero();
#pragma GCC unroll 8
    for (int kq = 0; kq < kQuadsPerGroup; kq += kChains) {
      const int64_t quad = g * kQuadsPerGroup + kq;
#pragma GCC unroll 8
      for (int h = 0; h < kChains; ++h) {
        const int8_t* wp = p + (quad + h) * kLanes * 4;
        __builtin_prefetch(wp + kPrefetchBytes, 0, 1);
        const WQuad w = load_quad(wp);
#pragma GCC unroll 8
        for (int i = 0; i < MR; ++i) sum[i][h] = dot4(sum[i][h], w, xq.quad(row0 + i, quad + h));
      }
    }
    for (int i = 0; i < MR; ++i) {
      const int64_t at = (row0 + i) * xq.groups + g;
      IVec total = sum[i][0];
      for (int h = 1; h < kChains; ++h) total = iadd(total, sum[i][h]);
      acc[i] = fmadd(to_float(iadd_offset(total, xq.offset[at])), xq.scale[at], acc[i]);
    }
  }
  store_panel_rows<MR>(acc, c, panel, row0);
}

// The rows left after the full blocks of kInt8DotRows: one block of exactly `left` rows.
template <int R>
void int8_dot_last_rows(const Call& c, const QuantizedRows& xq, int64_t panel, int64_t row0, int64_t left) {
  if constexpr (R > 0) {
    if (left == R) return int8_dot_panel<R>(c, xq, panel, row0);
    int8_dot_last_rows<R - 1>(c, xq, panel, row0, left);
  }
}

// x is fp32 [m][k_padded] (Call.x), quantized once per call; tiles go to torch's threads in chunks,
// as in run_tiles, and a thread reads its chunk's panels in memory order, each for all row blocks
// (a panel is 16 * k_padded bytes, cache-resident for the row blocks after the first).
void int8_dot_linear(const Call& c) {
  const QuantizedRows xq(static_cast<const float*>(c.x), c.m, c.k_padded);
  const int64_t tiles = c.n_padded / (kTilePanels * kLanes);
  const int64_t grain = std::max<int64_t>(1, kMinWeightsPerTask / (kTilePanels * kLanes * c.k_padded));
  parallel_chunks(tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t panel = begin * kTilePanels; panel < end * kTilePanels && panel * kLanes < c.n; ++panel) {
      int64_t row = 0;
      for (; c.m - row >= kInt8DotRows; row += kInt8DotRows) int8_dot_panel<kInt8DotRows>(c, xq, panel, row);
      int8_dot_last_rows<kInt8DotRows - 1>(c, xq, panel, row, c.m - row);
    }
  });
}
