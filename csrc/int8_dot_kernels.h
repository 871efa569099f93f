// int8 weights times int8 activations, integer dot products: the int8 matmul on CPUs with an
// instruction for it (AVX512-VNNI vpdpbusd; AVX2 vpmaddubsw + vpmaddwd).
//
// Converting every int8 weight to fp32 for an FMA costs three instructions per 16 weights, which on
// 2 cores bounds batch-1 decode below the memory bandwidth; a dot-product instruction takes 64 (or
// 32) weights at once. So the activations are quantized per row and group of 32 k, as llama.cpp's
// q8_0 does: q = round(x / s), s = max |x| / 127 over the group. A group's int32 sum is scaled by
// its s; the weights' per-channel scale comes last, in store_rows. Each x moves by at most s / 2.
//
// decode_kernels.cpp includes this file, after tile_kernels.h, inside the namespaces of the ISAs
// that have such an instruction, with these primitives for 16 output lanes:
//   IVec, izero(), iadd_offset(IVec, int32_t), to_float(IVec);
//   WQuad load_quad(const int8_t*): four k of 16 lanes, [16][4] bytes, as dot4 wants them;
//   dot4(IVec acc, const WQuad&, int32_t x4): acc + the 4-k dot of each lane with x4's four bytes;
//   kWeightBias: what dot4 adds to each weight (vpdpbusd multiplies unsigned bytes: w + 128),
//   undone with the group's sum of q.
// No include guard on purpose: every ISA needs its own copy.

constexpr int kQuadsPerGroup = kGroupK / 4;
// How far ahead of each panel's reads to prefetch: the four panels of a tile are four streams, and
// asking for the line 16 ahead took the block matmuls of a GPT-2 decode step from ~3.0 to ~2.7 ms.
constexpr int kPrefetchBytes = 1024;

// Activations quantized per row and group of 32 k; offset[row][group] = -kWeightBias * sum of q.
struct QuantizedRows {
  std::vector<int8_t> q;       // [m][k_padded]
  std::vector<float> scale;    // [m][groups]
  std::vector<int32_t> offset;
  int64_t k_padded, groups;

  QuantizedRows(const float* x, int64_t m, int64_t k_padded_)
      : q(m * k_padded_), scale(m * (k_padded_ / kGroupK)), offset(m * (k_padded_ / kGroupK)),
        k_padded(k_padded_), groups(k_padded_ / kGroupK) {
    for (int64_t r = 0; r < m; ++r) {
      for (int64_t g = 0; g < groups; ++g) {
        const float* xg = x + r * k_padded + g * kGroupK;
        float top = 0.0f;
        for (int k = 0; k < kGroupK; ++k) top = std::max(top, std::fabs(xg[k]));
        const float s = top / 127.0f, inverse = top > 0.0f ? 127.0f / top : 0.0f;
        int8_t* qg = q.data() + r * k_padded + g * kGroupK;
        int32_t sum = 0;
        for (int k = 0; k < kGroupK; ++k) {   // round half away from zero; |q| <= 127
          const float v = xg[k] * inverse;
          qg[k] = static_cast<int8_t>(static_cast<int32_t>(v + (v >= 0.0f ? 0.5f : -0.5f)));
          sum += qg[k];
        }
        scale[r * groups + g] = s;
        offset[r * groups + g] = -kWeightBias * sum;
      }
    }
  }

  int32_t quad(int64_t row, int64_t quad_index) const {   // four q of a row as one int32
    int32_t v;
    std::memcpy(&v, q.data() + row * k_padded + quad_index * 4, sizeof v);
    return v;
  }
};

// MR rows against one tile of kTilePanels panels, all of K.
template <int MR>
void int8_dot_block(const Call& c, const QuantizedRows& xq, int64_t tile, int64_t row0) {
  Vec acc[MR][kTilePanels];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < kTilePanels; ++j) acc[i][j] = zero();
  const int8_t* panels = static_cast<const int8_t*>(c.panels);
  const int64_t quads = c.k_padded / 4;
  for (int64_t g = 0; g < xq.groups; ++g) {
    IVec sum[MR][kTilePanels];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < kTilePanels; ++j) sum[i][j] = izero();
    for (int kq = 0; kq < kQuadsPerGroup; ++kq) {
      const int64_t quad = g * kQuadsPerGroup + kq;
#pragma GCC unroll 8
      for (int j = 0; j < kTilePanels; ++j) {
        const int8_t* wp = panels + ((tile * kTilePanels + j) * quads + quad) * kLanes * 4;
        __builtin_prefetch(wp + kPrefetchBytes);
        const WQuad w = load_quad(wp);
#pragma GCC unroll 8
        for (int i = 0; i < MR; ++i) sum[i][j] = dot4(sum[i][j], w, xq.quad(row0 + i, quad));
      }
    }
    for (int i = 0; i < MR; ++i) {
      const int64_t at = (row0 + i) * xq.groups + g;
      for (int j = 0; j < kTilePanels; ++j)
        acc[i][j] = fmadd(to_float(iadd_offset(sum[i][j], xq.offset[at])), xq.scale[at], acc[i][j]);
    }
  }
  store_rows<MR>(acc, c, tile, row0);
}

template <int R>
void int8_dot_last_rows(const Call& c, const QuantizedRows& xq, int64_t tile, int64_t row0, int64_t left) {
  if constexpr (R > 0) {
    if (left == R) return int8_dot_block<R>(c, xq, tile, row0);
    int8_dot_last_rows<R - 1>(c, xq, tile, row0, left);
  }
}

// x is fp32 [m][k_padded] (Call.x); tiles go to torch's threads in chunks, as in run_tiles.
void int8_dot_linear(const Call& c) {
  const QuantizedRows xq(static_cast<const float*>(c.x), c.m, c.k_padded);
  const int64_t tiles = c.n_padded / (kTilePanels * kLanes);
  const int64_t grain = std::max<int64_t>(1, kMinWeightsPerTask / (kTilePanels * kLanes * c.k_padded));
  parallel_chunks(tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      int64_t row = 0;
      for (; c.m - row >= kInt8DotRows; row += kInt8DotRows) int8_dot_block<kInt8DotRows>(c, xq, tile, row);
      int8_dot_last_rows<kInt8DotRows - 1>(c, xq, tile, row, c.m - row);
    }
  });
}
