// Kernels for decoding. Matmuls: y[M, N] = x[M, K] @ W[N, K]^T (+ bias) with M small (1..~16 rows),
// where the time goes into reading W once per step. W is packed by gptstack/inference/kernels.py
// into panels of 16 output channels, K-major, so a tile of panels streams through memory once and
// every weight loaded is used for all M rows. Formats: fp32, bf16, int8 (one scale per output
// channel) and int4 (q4_0-like: one scale per 32 k). Activations and outputs are fp32. Attention:
// one query per sequence over its keys and values where they lie in the paged KV cache's pool
// (gptstack/kv_cache.py), so decoding gathers no copies of them.
//
// One translation unit holds a copy of the kernel bodies (tile_kernels.h, attention_kernels.h) per
// instruction set, each compiled under its own `#pragma GCC target` (the pragma form of
// __attribute__((target))); the copy is picked at run time from what the CPU supports, so the
// library loads on any x86-64 (and builds on other CPUs with the generic copy). Threads: torch's
// own pool, through at::parallel_for.

#include <Python.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "kernels.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define GPTSTACK_X86 1
#include <immintrin.h>
#endif

namespace gptstack {

// ---- generic: plain loops the compiler vectorises for the baseline target -------------------------
namespace generic {
constexpr int kTilePanels = 4;
constexpr int kMaxRows = 4;
struct Vec { float v[kLanes]; };
inline Vec zero() { return {}; }
inline Vec load(const float* p) { Vec r; std::memcpy(r.v, p, sizeof r.v); return r; }
inline void store(float* p, Vec a) { std::memcpy(p, a.v, sizeof a.v); }
inline Vec add(Vec a, Vec b) { for (int l = 0; l < kLanes; ++l) a.v[l] += b.v[l]; return a; }
inline Vec mul(Vec a, Vec b) { for (int l = 0; l < kLanes; ++l) a.v[l] *= b.v[l]; return a; }
inline Vec fmadd(Vec w, float x, Vec acc) { for (int l = 0; l < kLanes; ++l) acc.v[l] += w.v[l] * x; return acc; }
inline Vec fmadd(Vec w, Vec s, Vec acc) { for (int l = 0; l < kLanes; ++l) acc.v[l] += w.v[l] * s.v[l]; return acc; }
inline Vec load_bf16(const uint16_t* p) {
  Vec r;
  for (int l = 0; l < kLanes; ++l) r.v[l] = bf16_to_float(p[l]);
  return r;
}
inline float reduce_add(Vec a) { float sum = 0; for (int l = 0; l < kLanes; ++l) sum += a.v[l]; return sum; }
inline void int8_pair(const int8_t* quad, int half, Vec& even, Vec& odd) {
  for (int l = 0; l < kLanes; ++l) { even.v[l] = quad[4 * l + 2 * half]; odd.v[l] = quad[4 * l + 2 * half + 1]; }
}
inline void bf16_pair(const uint16_t* p, Vec& even, Vec& odd) {
  for (int l = 0; l < kLanes; ++l) { even.v[l] = bf16_to_float(p[2 * l]); odd.v[l] = bf16_to_float(p[2 * l + 1]); }
}
inline void int4_pair(const uint8_t* p, Vec& even, Vec& odd) {
  for (int l = 0; l < kLanes; ++l) { even.v[l] = (p[l] & 15) - 8; odd.v[l] = (p[l] >> 4) - 8; }
}
#include "tile_kernels.h"
#include "attention_kernels.h"
}  // namespace generic

#ifdef GPTSTACK_X86
// ---- AVX2 + FMA: a 16-lane vector is two ymm registers ----------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
constexpr int kTilePanels = 2;   // 16 ymm registers: 2 rows x 2 panels x 2 halves of accumulators
constexpr int kMaxRows = 2;
struct Vec { __m256 lo, hi; };
inline Vec zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline Vec load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline void store(float* p, Vec a) { _mm256_storeu_ps(p, a.lo); _mm256_storeu_ps(p + 8, a.hi); }
inline Vec add(Vec a, Vec b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline Vec mul(Vec a, Vec b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline Vec fmadd(Vec w, float x, Vec acc) {
  const __m256 xs = _mm256_set1_ps(x);
  return {_mm256_fmadd_ps(w.lo, xs, acc.lo), _mm256_fmadd_ps(w.hi, xs, acc.hi)};
}
inline Vec fmadd(Vec w, Vec s, Vec acc) { return {_mm256_fmadd_ps(w.lo, s.lo, acc.lo), _mm256_fmadd_ps(w.hi, s.hi, acc.hi)}; }
inline __m256 bf16x8_to_float(const uint16_t* p) {
  const __m256i words = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(words, 16));
}
inline Vec load_bf16(const uint16_t* p) { return {bf16x8_to_float(p), bf16x8_to_float(p + 8)}; }
inline float reduce_add(Vec a) {
  const __m256 sum8 = _mm256_add_ps(a.lo, a.hi);
  __m128 sum4 = _mm_add_ps(_mm256_castps256_ps128(sum8), _mm256_extractf128_ps(sum8, 1));
  sum4 = _mm_add_ps(sum4, _mm_movehl_ps(sum4, sum4));
  return _mm_cvtss_f32(_mm_add_ss(sum4, _mm_movehdup_ps(sum4)));
}
inline void bf16_pair(const uint16_t* p, Vec& even, Vec& odd) {
  const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + kLanes));
  const __m256i high_half = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  even = {_mm256_castsi256_ps(_mm256_slli_epi32(lo, 16)), _mm256_castsi256_ps(_mm256_slli_epi32(hi, 16))};
  odd = {_mm256_castsi256_ps(_mm256_and_si256(lo, high_half)), _mm256_castsi256_ps(_mm256_and_si256(hi, high_half))};
}
inline void int4x8_pair(const uint8_t* p, __m256& even, __m256& odd) {
  const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m256 eight = _mm256_set1_ps(8.0f);
  even = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(bytes, _mm256_set1_epi32(15))), eight);
  odd = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(bytes, 4)), eight);
}
inline void int4_pair(const uint8_t* p, Vec& even, Vec& odd) {
  int4x8_pair(p, even.lo, odd.lo);
  int4x8_pair(p + 8, even.hi, odd.hi);
}
// int8 dot products without VNNI, as llama.cpp does on AVX2: vpmaddubsw multiplies unsigned by signed
// bytes, so it gets |w| and x with w's sign; two products of |127| fit its int16 sums.
constexpr int kInt8DotRows = 1;     // 16 ymm: 2 chains x 2 halves of int32 sums, fp32 sums, a weight quad
constexpr int kInt8DotChains = 2;
constexpr int32_t kWeightBias = 0;
struct IVec { __m256i lo, hi; };
inline IVec izero() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
inline IVec iadd(IVec a, IVec b) { return {_mm256_add_epi32(a.lo, b.lo), _mm256_add_epi32(a.hi, b.hi)}; }
inline IVec iadd_offset(IVec a, int32_t) { return a; }
inline Vec to_float(IVec a) { return {_mm256_cvtepi32_ps(a.lo), _mm256_cvtepi32_ps(a.hi)}; }
struct WQuad { __m256i abs_lo, abs_hi, raw_lo, raw_hi; };
inline WQuad load_quad(const int8_t* p) {
  const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));
  return {_mm256_abs_epi8(lo), _mm256_abs_epi8(hi), lo, hi};
}
inline __m256i dot4_half(__m256i acc, __m256i abs_w, __m256i w, __m256i x) {
  const __m256i pairs = _mm256_maddubs_epi16(abs_w, _mm256_sign_epi8(x, w));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
inline IVec dot4(IVec acc, const WQuad& w, int32_t x4) {
  const __m256i x = _mm256_set1_epi32(x4);
  return {dot4_half(acc.lo, w.abs_lo, w.raw_lo, x), dot4_half(acc.hi, w.abs_hi, w.raw_hi, x)};
}
// A group of 32 activations: plain loops (once per call, not per weight).
inline float max_abs32(const float* x) {
  float top = 0.0f;
  for (int k = 0; k < kGroupK; ++k) top = std::max(top, std::fabs(x[k]));
  return top;
}
inline int32_t round32(const float* x, float inverse, int8_t* q) {   // round half away from zero; |q| <= 127
  int32_t sum = 0;
  for (int k = 0; k < kGroupK; ++k) {
    const float v = x[k] * inverse;
    q[k] = static_cast<int8_t>(static_cast<int32_t>(v + (v >= 0.0f ? 0.5f : -0.5f)));
    sum += q[k];
  }
  return sum;
}
#define GPTSTACK_INT8_DOT
#include "tile_kernels.h"
#include "int8_dot_kernels.h"
#undef GPTSTACK_INT8_DOT
#include "attention_kernels.h"
}  // namespace avx2
#pragma GCC pop_options

// ---- AVX-512 (and AVX-512 BF16): a 16-lane vector is one zmm register --------------------------------
// Both copies share these primitives; the bf16 one also multiplies bf16 weights with vdpbf16ps.
#define GPTSTACK_AVX512_PRIMITIVES                                                                      \
  constexpr int kTilePanels = 4; /* 32 zmm: 4 rows x 4 panels of accumulators + 4 weights */         \
  constexpr int kMaxRows = 4;                                                                           \
  using Vec = __m512;                                                                                   \
  inline Vec zero() { return _mm512_setzero_ps(); }                                                     \
  inline Vec load(const float* p) { return _mm512_loadu_ps(p); }                                       \
  inline void store(float* p, Vec a) { _mm512_storeu_ps(p, a); }                                        \
  inline Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }                                          \
  inline Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }                                          \
  inline Vec fmadd(Vec w, float x, Vec acc) { return _mm512_fmadd_ps(w, _mm512_set1_ps(x), acc); }    \
  inline Vec fmadd(Vec w, Vec s, Vec acc) { return _mm512_fmadd_ps(w, s, acc); }                        \
  inline Vec load_bf16(const uint16_t* p) {                                                             \
    const __m512i words = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); \
    return _mm512_castsi512_ps(_mm512_slli_epi32(words, 16));                                           \
  }                                                                                                     \
  inline float reduce_add(Vec a) { return _mm512_reduce_add_ps(a); }                                    \
  /* k 2 half and 2 half + 1 of a quad ([16][4] bytes): each int32 lane's bytes, sign-extended */      \
  inline void int8_pair(const int8_t* quad, int half, Vec& even, Vec& odd) {                            \
    const __m512i words = _mm512_loadu_si512(quad);                                                     \
    even = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(words, 24 - 16 * half), 24));         \
    odd = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(words, 16 - 16 * half), 24));          \
  }                                                                                                     \
  inline void bf16_pair(const uint16_t* p, Vec& even, Vec& odd) {                                       \
    const __m512i words = _mm512_loadu_si512(p);                                                        \
    even = _mm512_castsi512_ps(_mm512_slli_epi32(words, 16));                                           \
    odd = _mm512_castsi512_ps(_mm512_and_si512(words, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)))); \
  }                                                                                                     \
  /* a nibble indexes a 16-entry table of q - 8: one permute per 16 weights, no conversion */           \
  inline void int4_pair(const uint8_t* p, Vec& even, Vec& odd) {                                        \
    const __m512 minus8_to_7 = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);  \
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));   \
    even = _mm512_permutexvar_ps(bytes, minus8_to_7); /* uses the low 4 bits of each index */          \
    odd = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), minus8_to_7);                              \
  }

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
namespace avx512 {
GPTSTACK_AVX512_PRIMITIVES
#include "tile_kernels.h"
#include "attention_kernels.h"
}  // namespace avx512
#pragma GCC pop_options

// AVX512-VNNI: int8 dot products with vpdpbusd (unsigned by signed bytes: the weights get + 128).
#define GPTSTACK_VNNI_PRIMITIVES                                                                        \
  constexpr int kInt8DotRows = 3; /* 3 rows x 4 chains of int32 sums + 3 fp32 sums + weight quads */    \
  constexpr int kInt8DotChains = 4;                                                                     \
  constexpr int32_t kWeightBias = 128;                                                                  \
  using IVec = __m512i;                                                                                 \
  inline IVec izero() { return _mm512_setzero_si512(); }                                                \
  inline IVec iadd(IVec a, IVec b) { return _mm512_add_epi32(a, b); }                                   \
  inline IVec iadd_offset(IVec a, int32_t b) { return _mm512_add_epi32(a, _mm512_set1_epi32(b)); }      \
  inline Vec to_float(IVec a) { return _mm512_cvtepi32_ps(a); }                                         \
  using WQuad = __m512i;                                                                                \
  inline WQuad load_quad(const int8_t* p) {                                                             \
    return _mm512_xor_si512(_mm512_loadu_si512(p), _mm512_set1_epi32(static_cast<int>(0x80808080u)));  \
  }                                                                                                     \
  inline IVec dot4(IVec acc, WQuad w, int32_t x4) { return _mm512_dpbusd_epi32(acc, w, _mm512_set1_epi32(x4)); } \
  /* a group of 32 activations, two zmm: the scalar loops' arithmetic lane by lane (same results) */   \
  inline float max_abs32(const float* x) {                                                              \
    return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(x)),                        \
                                              _mm512_abs_ps(_mm512_loadu_ps(x + 16))));                 \
  }                                                                                                     \
  inline int32_t round32(const float* x, float inverse, int8_t* q) { /* half away from zero */          \
    __m512i sum = _mm512_setzero_si512();                                                               \
    for (int h = 0; h < 2; ++h) {                                                                       \
      const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(x + 16 * h), _mm512_set1_ps(inverse));             \
      const __m512 half = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_GE_OQ),  \
                                               _mm512_set1_ps(-0.5f), _mm512_set1_ps(0.5f));            \
      const __m512i qi = _mm512_cvttps_epi32(_mm512_add_ps(v, half));                                    \
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16 * h), _mm512_cvtepi32_epi8(qi));                \
      sum = _mm512_add_epi32(sum, qi);                                                                  \
    }                                                                                                   \
    return _mm512_reduce_add_epi32(sum);                                                                \
  }

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vnni,avx2,fma")
namespace avx512_vnni {
GPTSTACK_AVX512_PRIMITIVES
GPTSTACK_VNNI_PRIMITIVES
#define GPTSTACK_INT8_DOT
#include "tile_kernels.h"
#include "int8_dot_kernels.h"
#undef GPTSTACK_INT8_DOT
#include "attention_kernels.h"
}  // namespace avx512_vnni
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vnni,avx512bf16,avx2,fma")
namespace avx512_bf16 {
GPTSTACK_AVX512_PRIMITIVES
GPTSTACK_VNNI_PRIMITIVES
#define GPTSTACK_BF16_DOT
#define GPTSTACK_INT8_DOT
#include "tile_kernels.h"
#include "int8_dot_kernels.h"
#undef GPTSTACK_INT8_DOT
#undef GPTSTACK_BF16_DOT
#include "attention_kernels.h"
}  // namespace avx512_bf16
#pragma GCC pop_options
#endif  // GPTSTACK_X86

// ---- run-time dispatch ----------------------------------------------------------------------------
// Ordered from least to most capable; the active one is the best the CPU has, capped by select_isa.
enum class Isa { Generic, Avx2, Avx512, Avx512Vnni, Avx512Bf16 };
constexpr const char* kIsaNames[] = {"generic", "avx2", "avx512", "avx512_vnni", "avx512_bf16"};
constexpr int kIsaCount = 5;

Isa best_supported_isa() {
#ifdef GPTSTACK_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) {
    if (!__builtin_cpu_supports("avx512bw") || !__builtin_cpu_supports("avx512vnni")) return Isa::Avx512;
    return __builtin_cpu_supports("avx512bf16") ? Isa::Avx512Bf16 : Isa::Avx512Vnni;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::Avx2;
#endif
  return Isa::Generic;
}

std::atomic<Isa> active_isa{best_supported_isa()};

// Each ISA's copy of the kernels, indexed by Isa.
struct Kernels {
  void (*linear)(const Call&);
  void (*paged_attention)(const PagedAttention&);
};
const Kernels kKernels[] = {
    {generic::linear, generic::paged_attention},
#ifdef GPTSTACK_X86
    {avx2::linear, avx2::paged_attention},
    {avx512::linear, avx512::paged_attention},
    {avx512_vnni::linear, avx512_vnni::paged_attention},
    {avx512_bf16::linear, avx512_bf16::paged_attention},
#endif
};
const Kernels& kernels(Isa isa) { return kKernels[static_cast<int>(isa)]; }

void linear(const Call& call) { kernels(active_isa.load()).linear(call); }
void paged_attention(const PagedAttention& attention) { kernels(active_isa.load()).paged_attention(attention); }
bool bf16_dot_active() { return active_isa.load() == Isa::Avx512Bf16; }
bool int8_dot_active() { return active_isa.load() != Isa::Generic && active_isa.load() != Isa::Avx512; }

std::string isa() { return kIsaNames[static_cast<int>(active_isa.load())]; }

// Use at most `cap` (one of kIsaNames); returns the ISA now in use.
std::string select_isa(const std::string& cap) {
  int wanted = -1;
  for (int i = 0; i < kIsaCount; ++i)
    if (cap == kIsaNames[i]) wanted = i;
  TORCH_CHECK(wanted >= 0, "unknown ISA '", cap, "': expected generic, avx2, avx512, avx512_vnni or avx512_bf16");
  active_isa = static_cast<Isa>(std::min(wanted, static_cast<int>(best_supported_isa())));
  return isa();
}

// ---- the ops --------------------------------------------------------------------------------------
// Panels: fp32 [P, K, 16]; bf16 [P, K/2, 16, 2]; int8 [P, K/4, 16, 4]; int4 [P, K/2, 16] uint8; P a multiple of 4.
void check_panels(const at::Tensor& panels, at::ScalarType dtype, int64_t dims) {
  TORCH_CHECK(panels.scalar_type() == dtype && panels.is_contiguous() && panels.dim() == dims &&
                  panels.size(0) % 4 == 0 && panels.size(2) == kLanes,
              "panels must be contiguous ", dtype, " from gptstack.inference.kernels.pack");
}

at::Tensor run_linear(Format format, const at::Tensor& x, const at::Tensor& panels, const float* group_scales,
                      const std::optional<at::Tensor>& channel_scale, const std::optional<at::Tensor>& bias,
                      int64_t out_features, int64_t k_padded) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "x must be a 2-D CPU tensor [rows, in_features]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be fp32 or bf16");
  const int64_t m = x.size(0), k = x.size(1), n_padded = panels.size(0) * kLanes;
  TORCH_CHECK(k <= k_padded && k_padded % kGroupK == 0 && k_padded - k < kGroupK,
              "x has ", k, " features but the weights were packed for ", k_padded);
  TORCH_CHECK(out_features <= n_padded && n_padded - out_features < 4 * kLanes, "out_features does not match the panels");
  for (const auto* per_channel : {&channel_scale, &bias}) {
    if (per_channel->has_value()) {
      const at::Tensor& t = per_channel->value();
      TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == n_padded,
                  "bias and scales must be contiguous fp32 of out_features padded to the panels");
    }
  }
  const Isa isa_now = active_isa.load();
  const bool bf16_dot = format == Format::Bf16 && isa_now == Isa::Avx512Bf16;
  const at::ScalarType x_dtype = bf16_dot ? at::kBFloat16 : at::kFloat;
  at::Tensor xw = x;
  if (x.scalar_type() != x_dtype || !x.is_contiguous() || k != k_padded) {
    xw = at::zeros({m, k_padded}, x.options().dtype(x_dtype));
    xw.narrow(1, 0, k).copy_(x);
  }
  at::Tensor y = at::empty({m, out_features}, x.options().dtype(at::kFloat));
  if (m == 0) return y;
  const Call call{format,
                  panels.data_ptr(),
                  group_scales,
                  channel_scale ? channel_scale->data_ptr<float>() : nullptr,
                  bias ? bias->data_ptr<float>() : nullptr,
                  xw.data_ptr(),
                  bf16_dot ? k_padded / 2 : k_padded,
                  m,
                  k_padded,
                  out_features,
                  n_padded,
                  y.data_ptr<float>()};
  kernels(isa_now).linear(call);
  return y;
}

at::Tensor linear_fp32(const at::Tensor& x, const at::Tensor& panels, const std::optional<at::Tensor>& bias,
                       int64_t out_features) {
  check_panels(panels, at::kFloat, 3);
  return run_linear(Format::Fp32, x, panels, nullptr, std::nullopt, bias, out_features, panels.size(1));
}

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& panels, const std::optional<at::Tensor>& bias,
                       int64_t out_features) {
  check_panels(panels, at::kBFloat16, 4);
  return run_linear(Format::Bf16, x, panels, nullptr, std::nullopt, bias, out_features, panels.size(1) * 2);
}

at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& panels, const at::Tensor& scale,
                       const std::optional<at::Tensor>& bias, int64_t out_features) {
  check_panels(panels, at::kChar, 4);
  return run_linear(Format::Int8, x, panels, nullptr, scale, bias, out_features, panels.size(1) * 4);
}

at::Tensor linear_int4(const at::Tensor& x, const at::Tensor& panels, const at::Tensor& scales,
                       const std::optional<at::Tensor>& bias, int64_t out_features) {
  check_panels(panels, at::kByte, 3);
  const int64_t k_padded = panels.size(1) * 2;
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() &&
                  scales.numel() == panels.size(0) * (k_padded / kGroupK) * kLanes,
              "int4 scales must be contiguous fp32 [panels, K/32, 16]");
  return run_linear(Format::Int4, x, panels, scales.data_ptr<float>(), std::nullopt, bias, out_features, k_padded);
}

// softmax(q . k * scale) . v for one query per sequence over its keys in the pool (see PagedAttention).
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                                  const at::Tensor& key_slots, const at::Tensor& key_lengths, int64_t band_width,
                                  double scale) {
  TORCH_CHECK(q.dim() == 3 && q.device().is_cpu(), "q must be a CPU tensor [sequences, heads, head_dim]");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16, "q must be fp32 or bf16");
  const int64_t sequences = q.size(0), heads = q.size(1), head_dim = q.size(2);
  for (const auto* pool : {&k_pool, &v_pool}) {
    TORCH_CHECK(pool->scalar_type() == q.scalar_type() && pool->is_contiguous() && pool->dim() == 3 &&
                    pool->size(1) == heads && pool->size(2) == head_dim && pool->device().is_cpu(),
                "the pools must be contiguous [slots, heads, head_dim] in q's dtype");
  }
  TORCH_CHECK(key_slots.scalar_type() == at::kLong && key_slots.dim() == 2 && key_slots.size(0) == sequences &&
                  key_lengths.scalar_type() == at::kLong && key_lengths.dim() == 1 &&
                  key_lengths.size(0) == sequences,
              "key_slots must be int64 [sequences, keys] and key_lengths int64 [sequences]");
  const at::Tensor slots = key_slots.contiguous(), lengths = key_lengths.contiguous();
  const at::Tensor q32 = q.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({sequences, heads, head_dim}, q32.options());
  PagedAttention a{q32.data_ptr<float>(), heads * head_dim, k_pool.data_ptr(), v_pool.data_ptr(), q.scalar_type() == at::kBFloat16,
                   slots.data_ptr<int64_t>(), lengths.data_ptr<int64_t>(), sequences, heads, head_dim,
                   slots.size(1), band_width, 0, 0, static_cast<float>(scale), out.data_ptr<float>()};
  // Every slot the kernel will read is checked here, once, rather than trusted.
  for (int64_t s = 0; s < sequences; ++s) {
    const int64_t end = a.key_lengths[s], begin = visible_begin(end, band_width);
    TORCH_CHECK(end >= 1 && end <= a.max_keys, "key_lengths[", s, "] = ", end, " is not in [1, ", a.max_keys, "]");
    for (int64_t l = begin; l < end; ++l) {
      const int64_t slot = a.key_slots[s * a.max_keys + l];
      TORCH_CHECK(slot >= 0 && slot < k_pool.size(0), "key_slots[", s, ", ", l, "] = ", slot, " is not a pool slot");
    }
    a.visible_keys += end - begin;
    a.most_visible = std::max(a.most_visible, end - begin);
  }
  if (sequences > 0 && heads > 0) kernels(active_isa.load()).paged_attention(a);
  return out.to(q.scalar_type());
}

TORCH_LIBRARY(gptstack, m) {
  m.def("linear_fp32(Tensor x, Tensor panels, Tensor? bias, int out_features) -> Tensor", &linear_fp32);
  m.def("linear_bf16(Tensor x, Tensor panels, Tensor? bias, int out_features) -> Tensor", &linear_bf16);
  m.def("linear_int8(Tensor x, Tensor panels, Tensor scale, Tensor? bias, int out_features) -> Tensor", &linear_int8);
  m.def("linear_int4(Tensor x, Tensor panels, Tensor scales, Tensor? bias, int out_features) -> Tensor", &linear_int4);
  m.def("paged_decode_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor key_slots, Tensor key_lengths, "
        "int band_width, float scale) -> Tensor", &paged_decode_attention);
  m.def("isa() -> str", &isa);
  m.def("int8_rounds_activations() -> bool", &int8_dot_active);
  m.def("select_isa(str cap) -> str", &select_isa);
}

}  // namespace gptstack

// `import gptstack._kernels` loads this library, which registers the ops above as torch.ops.gptstack.*.
static PyModuleDef kernels_module = {PyModuleDef_HEAD_INIT, "_kernels", "gptstack decode kernels", -1, nullptr};
PyMODINIT_FUNC PyInit__kernels() { return PyModule_Create(&kernels_module); }
