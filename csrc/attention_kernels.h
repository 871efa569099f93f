// Decode attention over a paged KV cache, compiled once per instruction set.
//
// decode_kernels.cpp includes this file inside one namespace per ISA, under that ISA's
// `#pragma GCC target`, with the 16-lane primitives tile_kernels.h uses (zero, load, store,
// fmadd) plus load_bf16(const uint16_t*) (16 bf16 as floats) and reduce_add(Vec) (the sum of the
// lanes). No include guard on purpose: every ISA needs its own copy.

inline Vec load_lanes(const float* p) { return load(p); }
inline Vec load_lanes(const uint16_t* p) { return load_bf16(p); }
inline float scalar(float x) { return x; }
inline float scalar(uint16_t bits) { return bf16_to_float(bits); }

// q . k over d elements: whole vectors, then the tail (d need not be a multiple of 16).
template <class T>
float dot(const float* q, const T* k, int64_t d) {
  Vec acc = zero();
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes) acc = fmadd(load_lanes(k + i), load(q + i), acc);
  float sum = reduce_add(acc);
  for (; i < d; ++i) sum += q[i] * scalar(k[i]);
  return sum;
}

// out += p * v over d elements.
template <class T>
void add_scaled(float p, const T* v, float* out, int64_t d) {
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes) store(out + i, fmadd(load_lanes(v + i), p, load(out + i)));
  for (; i < d; ++i) out[i] += p * scalar(v[i]);
}

// Heads [h0, h1) of sequence s: the scores of the visible keys, softmax, then the weighted sum of
// the values, straight into `out`. The keys are read where they lie in the pool, slot by slot with
// all those heads together: runs of (h1 - h0) * head_dim contiguous elements, not one head's
// elements at a stride of the whole slot. `scores` holds (h1 - h0) * most_visible floats.
template <class T>
void attend_heads(const PagedAttention& a, int64_t s, int64_t h0, int64_t h1, float* scores) {
  const int64_t d = a.head_dim, slot_stride = a.heads * d, heads = h1 - h0;
  const int64_t end = a.key_lengths[s], begin = visible_begin(end, a.band_width), n = end - begin;
  const int64_t* slots = a.key_slots + s * a.max_keys + begin;
  const T* k_pool = static_cast<const T*>(a.k_pool) + h0 * d;
  const T* v_pool = static_cast<const T*>(a.v_pool) + h0 * d;
  const float* q = a.q + s * a.q_stride + h0 * d;
  float* out = a.out + (s * a.heads + h0) * d;
  for (int64_t j = 0; j < n; ++j) {
    const T* k = k_pool + slots[j] * slot_stride;
    for (int64_t h = 0; h < heads; ++h) scores[h * n + j] = a.scale * dot(q + h * d, k + h * d, d);
  }
  for (int64_t h = 0; h < heads; ++h) {     // softmax, each head's max subtracted
    float* p = scores + h * n;
    const float top = *std::max_element(p, p + n);
    float total = 0;
    for (int64_t j = 0; j < n; ++j) total += p[j] = std::exp(p[j] - top);
    for (int64_t j = 0; j < n; ++j) p[j] /= total;
  }
  std::fill(out, out + heads * d, 0.0f);
  for (int64_t j = 0; j < n; ++j) {
    const T* v = v_pool + slots[j] * slot_stride;
    for (int64_t h = 0; h < heads; ++h) add_scaled(scores[h * n + j], v + h * d, out + h * d, d);
  }
}

// Rows (s, h) go to torch's threads in chunks (parallel_chunks); a thread takes the heads of a
// chunk's rows sequence by sequence, with one scores buffer per chunk.
template <class T>
void attend_rows(const PagedAttention& a) {
  const int64_t rows = a.sequences * a.heads;
  const int64_t keys_per_row = std::max<int64_t>(1, a.visible_keys / a.sequences);
  // a row reads 2 * keys * head_dim elements; a task gets as many as a matmul task reads weights
  const int64_t grain = std::max<int64_t>(1, kMinWeightsPerTask / (2 * keys_per_row * a.head_dim));
  parallel_chunks(rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(a.heads * a.most_visible);
    for (int64_t row = begin; row < end;) {
      const int64_t s = row / a.heads, h0 = row % a.heads, h1 = std::min(a.heads, h0 + end - row);
      attend_heads<T>(a, s, h0, h1, scores.data());
      row += h1 - h0;
    }
  });
}

void paged_attention(const PagedAttention& a) {
  if (a.bf16) return attend_rows<uint16_t>(a);
  attend_rows<float>(a);
}
