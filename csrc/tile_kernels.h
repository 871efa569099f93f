// The decode matmul body, compiled once per instruction set.
//
// decode_kernels.cpp includes this file inside one namespace per ISA, under that ISA's
// `#pragma GCC target`, after defining the ISA's 16-lane float vector `Vec` and its primitives:
//   zero(), load(const float*), store(float*, Vec), add(Vec, Vec), mul(Vec, Vec),
//   fmadd(Vec w, float x, Vec acc) and fmadd(Vec w, Vec s, Vec acc) = acc + w * x (or s),
//   bf16_pair / int4_pair(ptr, Vec& even, Vec& odd): one k pair of a panel as floats, and
//   int8_pair(quad, half, Vec& even, Vec& odd) unless GPTSTACK_INT8_DOT (int8_dot_kernels.h) is defined,
// and the register blocking kTilePanels (panels per tile) and kMaxRows (activation rows per block).
// With GPTSTACK_BF16_DOT defined, bf16 weights go through vdpbf16ps (activations rounded to bf16).
// No include guard on purpose: every ISA needs its own copy.

// Formats whose weights become fp32 vectors and meet fp32 activations, two k at a time.
struct FloatPairs {
  using X = float;                       // the activation element the kernel reads
  static constexpr int kXPerPair = 2;    // activation elements per k pair
  static constexpr bool kScalePerGroup = false;
  struct Pair { Vec even, odd; };
  static Vec madd(Vec acc, const Pair& w, const float* x) {
    return fmadd(w.odd, x[1], fmadd(w.even, x[0], acc));
  }
};

// A k pair of a group of an fp32 panel ([k_padded][16] floats): two loads.
inline void fp32_pair_at(const float* group, int kk, Vec& even, Vec& odd) {
  even = load(group + 2 * kk * kLanes);
  odd = load(group + (2 * kk + 1) * kLanes);
}
// bf16 [k_padded / 2][16][2]: lane j's two k of a pair share one 32-bit word (vdpbf16ps' layout).
inline void bf16_pair_at(const uint16_t* group, int kk, Vec& even, Vec& odd) { bf16_pair(group + 2 * kk * kLanes, even, odd); }

// Panels of 16 lanes times k_padded elements of T, whose weights become fp32 vectors a k pair at a
// time: unpack(group, kk, even, odd) reads pair kk of a group of 32 k.
template <typename T, void (*unpack)(const T*, int, Vec&, Vec&)>
struct UnpackedPairs : FloatPairs {
  const T* panels;
  int64_t k_padded;
  struct Group { const T* p; };
  Group group(int64_t panel, int64_t g) const { return {panels + (panel * k_padded + g * kGroupK) * kLanes}; }
  Pair pair(const Group& grp, int kk) const {
    Pair w;
    unpack(grp.p, kk, w.even, w.odd);
    return w;
  }
};
using Fp32Weights = UnpackedPairs<float, fp32_pair_at>;
using Bf16Weights = UnpackedPairs<uint16_t, bf16_pair_at>;

#ifdef GPTSTACK_INT8_DOT
void int8_dot_linear(const Call& c);   // int8_dot_kernels.h
#else
// int8 panel: [k_padded / 4][16][4] (a lane's four k side by side, vpdpbusd's layout), unpacked to
// floats a k pair at a time by int8_pair(quad, half, ...); the per-channel scale is applied once, in
// store_rows.
inline void int8_pair_at(const int8_t* group, int kk, Vec& even, Vec& odd) {
  int8_pair(group + (kk / 2) * 4 * kLanes, kk % 2, even, odd);
}
using Int8Weights = UnpackedPairs<int8_t, int8_pair_at>;
#endif

// int4 panel: [k_padded / 2][16] bytes, low nibble k even, high nibble k odd, each q + 8;
// scales [panels][k_padded / 32][16]: one per output channel and group of 32 k, applied to the
// group's sum (one FMA per 32 k rather than a multiply per weight).
struct Int4Weights : FloatPairs {
  static constexpr bool kScalePerGroup = true;
  const uint8_t* panels;
  const float* scales;
  int64_t k_padded;
  struct Group { const uint8_t* p; Vec scale; };
  Group group(int64_t panel, int64_t g) const {
    const int64_t groups = k_padded / kGroupK;
    return {panels + (panel * k_padded / 2 + g * kPairsPerGroup) * kLanes,
            load(scales + (panel * groups + g) * kLanes)};
  }
  Pair pair(const Group& grp, int kk) const {
    Pair w;
    int4_pair(grp.p + kk * kLanes, w.even, w.odd);
    return w;
  }
};

#ifdef GPTSTACK_BF16_DOT
// bf16 weights times bf16-rounded activations, a k pair per vdpbf16ps (fp32 accumulation).
struct Bf16DotWeights : Bf16Weights {
  using X = uint32_t;                    // two bf16 activations, k even in the low half
  static constexpr int kXPerPair = 1;
  struct Pair { __m512i words; };
  Pair pair(const Group& grp, int kk) const { return {_mm512_loadu_si512(grp.p + 2 * kk * kLanes)}; }
  static Vec madd(Vec acc, const Pair& w, const uint32_t* x) {
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32(static_cast<int>(*x)), (__m512bh)w.words);
  }
};
inline Bf16DotWeights bf16_weights(const uint16_t* panels, int64_t k_padded) { return {{{}, panels, k_padded}}; }
#else
inline Bf16Weights bf16_weights(const uint16_t* panels, int64_t k_padded) { return {{}, panels, k_padded}; }
#endif

// acc * channel scale + bias of one panel into rows row0.. of y, dropping the padding columns.
template <int MR>
void store_panel_rows(const Vec (&acc)[MR], const Call& c, int64_t panel, int64_t row0) {
  const int64_t col = panel * kLanes;
  if (col >= c.n) return;
  for (int i = 0; i < MR; ++i) {
    Vec v = acc[i];
    if (c.channel_scale) v = mul(v, load(c.channel_scale + col));
    if (c.bias) v = add(v, load(c.bias + col));
    float* out = c.y + (row0 + i) * c.n + col;
    if (col + kLanes <= c.n) {
      store(out, v);
    } else {
      float last[kLanes];
      store(last, v);
      std::copy(last, last + (c.n - col), out);
    }
  }
}

// The same for a tile's kTilePanels panels.
template <int MR>
void store_rows(const Vec (&acc)[MR][kTilePanels], const Call& c, int64_t tile, int64_t row0) {
  for (int j = 0; j < kTilePanels; ++j) {
    Vec panel_acc[MR];
    for (int i = 0; i < MR; ++i) panel_acc[i] = acc[i][j];
    store_panel_rows<MR>(panel_acc, c, tile * kTilePanels + j, row0);
  }
}

// One group of 32 k (16 pairs) of MR activation rows against a tile's panels, into acc.
template <class W, int MR>
void accumulate_group(const W& w, const typename W::Group (&grp)[kTilePanels], const typename W::X* xg,
                      int64_t x_stride, Vec (&acc)[MR][kTilePanels]) {
  for (int kk = 0; kk < kPairsPerGroup; ++kk) {
#pragma GCC unroll 8
    for (int j = 0; j < kTilePanels; ++j) {
      const typename W::Pair pair = w.pair(grp[j], kk);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) acc[i][j] = W::madd(acc[i][j], pair, xg + i * x_stride + kk * W::kXPerPair);
    }
  }
}

// MR activation rows against one tile (kTilePanels panels of 16 output channels), all of K.
template <class W, int MR>
void rows_block(const W& w, const Call& c, int64_t tile, int64_t row0) {
  Vec acc[MR][kTilePanels];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < kTilePanels; ++j) acc[i][j] = zero();
  const auto* x = static_cast<const typename W::X*>(c.x) + row0 * c.x_stride;
  const int64_t groups = c.k_padded / kGroupK;
  for (int64_t g = 0; g < groups; ++g) {
    typename W::Group grp[kTilePanels];
    for (int j = 0; j < kTilePanels; ++j) grp[j] = w.group(tile * kTilePanels + j, g);
    const auto* xg = x + g * kPairsPerGroup * W::kXPerPair;
    if constexpr (W::kScalePerGroup) {
      Vec sum[MR][kTilePanels];
      for (int i = 0; i < MR; ++i)
        for (int j = 0; j < kTilePanels; ++j) sum[i][j] = zero();
      accumulate_group<W, MR>(w, grp, xg, c.x_stride, sum);
      for (int i = 0; i < MR; ++i)
        for (int j = 0; j < kTilePanels; ++j) acc[i][j] = fmadd(sum[i][j], grp[j].scale, acc[i][j]);
    } else {
      accumulate_group<W, MR>(w, grp, xg, c.x_stride, acc);
    }
  }
  store_rows<MR>(acc, c, tile, row0);
}

// The rows left after the full blocks of kMaxRows: one block of exactly `left` rows.
template <class W, int R>
void last_rows(const W& w, const Call& c, int64_t tile, int64_t row0, int64_t left) {
  if constexpr (R > 0) {
    if (left == R) return rows_block<W, R>(w, c, tile, row0);
    last_rows<W, R - 1>(w, c, tile, row0, left);
  }
}

// Tiles go to torch's threads in chunks as they come free (parallel_chunks); each tile's weights
// are read from memory once and from cache for the further row blocks.
template <class W>
void run_tiles(const W& w, const Call& c) {
  constexpr int max_rows = W::kScalePerGroup ? std::max(1, kMaxRows / 2) : kMaxRows;  // room for group sums
  const int64_t tiles = c.n_padded / (kTilePanels * kLanes);
  const int64_t grain = std::max<int64_t>(1, kMinWeightsPerTask / (kTilePanels * kLanes * c.k_padded));
  parallel_chunks(tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      int64_t row = 0;
      for (; c.m - row >= max_rows; row += max_rows) rows_block<W, max_rows>(w, c, tile, row);
      last_rows<W, max_rows - 1>(w, c, tile, row, c.m - row);
    }
  });
}

void linear(const Call& c) {
  switch (c.format) {
    case Format::Fp32:
      return run_tiles(Fp32Weights{{}, static_cast<const float*>(c.panels), c.k_padded}, c);
    case Format::Bf16:
      return run_tiles(bf16_weights(static_cast<const uint16_t*>(c.panels), c.k_padded), c);
    case Format::Int8:
#ifdef GPTSTACK_INT8_DOT
      return int8_dot_linear(c);
#else
      return run_tiles(Int8Weights{{}, static_cast<const int8_t*>(c.panels), c.k_padded}, c);
#endif
    case Format::Int4:
      return run_tiles(Int4Weights{{}, static_cast<const uint8_t*>(c.panels), c.group_scales, c.k_padded}, c);
  }
}
