// A decode step's transformer as one call: embeddings, every block (LayerNorm, the fused q/k/v
// matmul, keys and values written into the paged pool, paged attention, the output projection, the
// MLP, both residual adds) and the final LayerNorm, for M sequences of one new token each.
//
// Why: a GPT-2 124M token is ~5 ms of matmuls on 2 cores, and running the same work as ~15 PyTorch
// ops per block from Python added ~3 ms more (op dispatch, small allocations, nn.Module calls).
// Here the matmuls and the attention are the kernels of decode_kernels.cpp, called directly; the
// rest is a few loops over M x n_embd floats. The residual stream stays in fp32 whatever the
// weights; keys and values are stored in the pool's dtype. gptstack/inference/decode_stack.py builds
// the stack from a model whose linear layers are packed DecodeLinear layers, and checks it against
// the model's own forward.

#include <Python.h>
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "kernels.h"

namespace gptstack {
namespace {

// The calling thread lets go of the GIL for the step if it holds it, so that a server's HTTP thread
// runs meanwhile.
class GilRelease {
 public:
  GilRelease() : state_(Py_IsInitialized() && PyGILState_Check() ? PyEval_SaveThread() : nullptr) {}
  ~GilRelease() {
    if (state_) PyEval_RestoreThread(state_);
  }
  GilRelease(const GilRelease&) = delete;
  GilRelease& operator=(const GilRelease&) = delete;

 private:
  PyThreadState* state_;
};

Format parse_format(const std::string& name) {
  if (name == "fp32") return Format::Fp32;
  if (name == "bf16") return Format::Bf16;
  if (name == "int8") return Format::Int8;
  if (name == "int4") return Format::Int4;
  TORCH_CHECK(false, "unknown weight format '", name, "': expected fp32, bf16, int8 or int4");
}

at::Tensor float_copy(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// A linear layer as gptstack.inference.kernels.pack left it: panels, int8 channel scales or int4
// group scales (empty when the format has none), bias padded to the panels.
struct PackedLinear {
  Format format;
  at::Tensor panels, scales, bias;
  int64_t in_features, out_features, k_padded, n_padded;

  PackedLinear(const std::string& name, at::Tensor panels_, at::Tensor scales_, at::Tensor bias_, int64_t in,
               int64_t out)
      : format(parse_format(name)), panels(std::move(panels_)), scales(std::move(scales_)), bias(std::move(bias_)),
        in_features(in), out_features(out) {
    const at::ScalarType dtypes[] = {at::kFloat, at::kBFloat16, at::kChar, at::kByte};
    TORCH_CHECK(panels.is_contiguous() && panels.scalar_type() == dtypes[static_cast<int>(format)] &&
                    panels.size(0) % 4 == 0 && panels.size(2) == kLanes,
                "panels must be contiguous ", name, " panels from gptstack.inference.kernels.pack");
    const int64_t k_per_row[] = {1, 2, 4, 2};   // k per panels.size(1) entry: fp32, bf16, int8, int4
    k_padded = panels.size(1) * k_per_row[static_cast<int>(format)];
    n_padded = panels.size(0) * kLanes;
    TORCH_CHECK(in <= k_padded && k_padded - in < kGroupK && out <= n_padded && n_padded - out < 4 * kLanes,
                "in/out features ", in, "/", out, " do not match the panels");
    TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.is_contiguous() && bias.numel() == n_padded,
                "bias must be contiguous fp32 padded to the panels");
    const bool scaled = format == Format::Int8 || format == Format::Int4;
    TORCH_CHECK(scaled == (scales.numel() > 0) && (!scaled || (scales.scalar_type() == at::kFloat && scales.is_contiguous())),
                "int8 and int4 need contiguous fp32 scales, fp32 and bf16 none");
  }

  // y[m][out_features] = x[m][in_features] @ W^T + bias. `staging` holds the activations in the form
  // the kernel reads when x is not it already (bf16 pairs for vdpbf16ps, or zero-padded K).
  void apply(const float* x, int64_t m, float* y, std::vector<uint8_t>& staging) const {
    const bool bf16_dot = format == Format::Bf16 && bf16_dot_active();
    const void* xw = x;
    if (bf16_dot) {
      staging.assign(m * k_padded * sizeof(c10::BFloat16), 0);
      auto* xb = reinterpret_cast<c10::BFloat16*>(staging.data());
      for (int64_t r = 0; r < m; ++r)
        for (int64_t k = 0; k < in_features; ++k) xb[r * k_padded + k] = c10::BFloat16(x[r * in_features + k]);
      xw = xb;
    } else if (in_features != k_padded) {
      staging.assign(m * k_padded * sizeof(float), 0);
      auto* xf = reinterpret_cast<float*>(staging.data());
      for (int64_t r = 0; r < m; ++r) std::copy(x + r * in_features, x + (r + 1) * in_features, xf + r * k_padded);
      xw = xf;
    }
    const float* s = scales.numel() ? scales.data_ptr<float>() : nullptr;
    linear(Call{format, panels.data_ptr(), format == Format::Int4 ? s : nullptr, format == Format::Int8 ? s : nullptr,
                bias.data_ptr<float>(), xw, bf16_dot ? k_padded / 2 : k_padded, m, k_padded, out_features,
                n_padded, y});
  }
};

struct Block {
  at::Tensor ln_1_weight, ln_1_bias, ln_2_weight, ln_2_bias;   // fp32
  PackedLinear qkv, attn_proj, fc, mlp_proj;
  int64_t band_width;                                             // 0: dense
  at::Tensor k_pool, v_pool;                                      // [slots, heads, head_dim]
};

// out = LayerNorm(x) row by row, statistics in double (rows are n_embd long: a few µs in all).
void layer_norm(const float* x, int64_t rows, int64_t width, const at::Tensor& weight, const at::Tensor& bias,
                double eps, float* out) {
  const float* w = weight.data_ptr<float>();
  const float* b = bias.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * width;
    double sum = 0, squares = 0;
    for (int64_t i = 0; i < width; ++i) sum += row[i];
    const double mean = sum / width;
    for (int64_t i = 0; i < width; ++i) squares += (row[i] - mean) * (row[i] - mean);
    const float inv_std = static_cast<float>(1.0 / std::sqrt(squares / width + eps));
    const float m = static_cast<float>(mean);
    for (int64_t i = 0; i < width; ++i) out[r * width + i] = (row[i] - m) * inv_std * w[i] + b[i];
  }
}

void add_into(float* x, const float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] += y[i];
}

template <class T>
void store_rows(const float* src, int64_t src_stride, int64_t rows, int64_t width, const int64_t* slots, T* pool) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < width; ++i) pool[slots[r] * width + i] = static_cast<T>(src[r * src_stride + i]);
}

// Embedding row `index` of `table` (fp32 or bf16) added to out.
void add_row(const at::Tensor& table, int64_t index, float* out) {
  const int64_t width = table.size(1);
  if (table.scalar_type() == at::kFloat) {
    add_into(out, table.data_ptr<float>() + index * width, width);
  } else {
    const auto* row = table.data_ptr<c10::BFloat16>() + index * width;
    for (int64_t i = 0; i < width; ++i) out[i] += static_cast<float>(row[i]);
  }
}

void check_index_vector(const at::Tensor& t, int64_t rows, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 1 && t.size(0) == rows && t.is_contiguous() && t.device().is_cpu(),
              name, " must be a contiguous int64 CPU tensor of one entry per sequence");
}

void check_range(const at::Tensor& t, int64_t low, int64_t high, const char* name) {
  const int64_t* p = t.data_ptr<int64_t>();
  for (int64_t i = 0; i < t.numel(); ++i)
    TORCH_CHECK(p[i] >= low && p[i] < high, name, "[", i, "] = ", p[i], " is not in [", low, ", ", high, ")");
}

class DecodeStack : public torch::CustomClassHolder {
 public:
  DecodeStack(at::Tensor wte, at::Tensor wpe, at::Tensor ln_f_weight, at::Tensor ln_f_bias, double eps,
              int64_t heads, std::string gelu_approximate)
      : wte_(wte.contiguous()), wpe_(wpe.contiguous()), ln_f_weight_(float_copy(ln_f_weight)),
        ln_f_bias_(float_copy(ln_f_bias)), eps_(eps), heads_(heads), gelu_approximate_(std::move(gelu_approximate)) {
    TORCH_CHECK(heads > 0, "heads must be positive");
    TORCH_CHECK(wte_.scalar_type() == at::kFloat || wte_.scalar_type() == at::kBFloat16, "embeddings must be fp32 or bf16");
    TORCH_CHECK(wpe_.scalar_type() == wte_.scalar_type() && wte_.dim() == 2 && wpe_.dim() == 2 &&
                    wte_.size(1) == wpe_.size(1) && wte_.size(1) % heads == 0,
                "token and position embeddings must share a dtype and a width divisible by the heads");
    TORCH_CHECK(gelu_approximate_ == "tanh" || gelu_approximate_ == "none", "gelu approximation must be tanh or none");
  }

  // One block: norms = [ln_1 weight, ln_1 bias, ln_2 weight, ln_2 bias]; four linear layers
  // (q/k/v fused, attention output, MLP in, MLP out), each as format, panels, scales, padded bias,
  // in and out features; the band width (0: dense) and the layer's key and value pools.
  void add_block(std::vector<at::Tensor> norms, std::vector<std::string> formats, std::vector<at::Tensor> panels,
                 std::vector<at::Tensor> scales, std::vector<at::Tensor> biases, std::vector<int64_t> in_features,
                 std::vector<int64_t> out_features, int64_t band_width, at::Tensor k_pool, at::Tensor v_pool) {
    TORCH_CHECK(norms.size() == 4 && formats.size() == 4 && panels.size() == 4 && scales.size() == 4 &&
                    biases.size() == 4 && in_features.size() == 4 && out_features.size() == 4,
                "a block has two LayerNorms and four linear layers");
    const int64_t c = width();
    const std::vector<std::pair<int64_t, int64_t>> shapes = {{c, 3 * c}, {c, c}, {c, out_features[2]}, {out_features[2], c}};
    std::vector<PackedLinear> linears;
    for (size_t i = 0; i < 4; ++i) {
      TORCH_CHECK(in_features[i] == shapes[i].first && out_features[i] == shapes[i].second,
                  "linear layer ", i, " of the block has shape ", out_features[i], "x", in_features[i]);
      linears.emplace_back(formats[i], panels[i], scales[i], biases[i], in_features[i], out_features[i]);
    }
    for (const auto* pool : {&k_pool, &v_pool}) {
      TORCH_CHECK(pool->scalar_type() == wte_.scalar_type() && pool->is_contiguous() && pool->dim() == 3 &&
                      pool->size(1) == heads_ && pool->size(1) * pool->size(2) == c,
                  "the key and value pools must be contiguous [slots, heads, head_dim] in the embeddings' dtype");
    }
    if (!blocks_.empty()) {   // forward sizes its buffers and checks slots by the first block
      TORCH_CHECK(out_features[2] == blocks_[0].fc.out_features && k_pool.size(0) == blocks_[0].k_pool.size(0),
                  "every block must have the first block's MLP width and pool size");
    }
    blocks_.push_back(Block{float_copy(norms[0]), float_copy(norms[1]), float_copy(norms[2]), float_copy(norms[3]),
                            linears[0], linears[1], linears[2], linears[3], band_width, k_pool, v_pool});
  }

  // Hidden states after the final LayerNorm [M, n_embd] (the embeddings' dtype) for M sequences of one
  // token each: sequence i brings tokens[i] at position positions[i], stores its keys and values in
  // pool slot write_slots[i], and attends to its keys 0 .. key_lengths[i] - 1, which lie in slots
  // key_slots[i, :] (the newest being its own).
  at::Tensor forward(at::Tensor tokens, at::Tensor positions, at::Tensor write_slots, at::Tensor key_slots,
                     at::Tensor key_lengths) {
    TORCH_CHECK(!blocks_.empty(), "the stack has no blocks");
    const int64_t m = tokens.size(0), c = width(), slots = blocks_[0].k_pool.size(0);
    for (auto [t, name] : {std::pair{&tokens, "tokens"}, {&positions, "positions"}, {&write_slots, "write_slots"},
                           {&key_lengths, "key_lengths"}})
      check_index_vector(*t, m, name);
    TORCH_CHECK(key_slots.scalar_type() == at::kLong && key_slots.dim() == 2 && key_slots.size(0) == m &&
                    key_slots.is_contiguous(),
                "key_slots must be contiguous int64 [sequences, keys]");
    const int64_t max_keys = key_slots.size(1);
    if (m == 0) return at::empty({0, c}, wte_.options());
    check_range(tokens, 0, wte_.size(0), "tokens");
    check_range(positions, 0, wpe_.size(0), "positions");
    check_range(write_slots, 0, slots, "write_slots");
    check_range(key_lengths, 1, max_keys + 1, "key_lengths");
    const int64_t* lengths = key_lengths.data_ptr<int64_t>();
    const int64_t* key_slot = key_slots.data_ptr<int64_t>();
    for (int64_t s = 0; s < m; ++s) {   // every key any layer reads is checked once, here
      TORCH_CHECK(positions.data_ptr<int64_t>()[s] == lengths[s] - 1, "sequence ", s, "'s token must be its newest key");
      for (int64_t l = 0; l < lengths[s]; ++l)
        TORCH_CHECK(key_slot[s * max_keys + l] >= 0 && key_slot[s * max_keys + l] < slots, "key_slots[", s, ", ", l,
                    "] = ", key_slot[s * max_keys + l], " is not a pool slot");
    }
    GilRelease gil;
    const int64_t mlp_width = blocks_[0].fc.out_features, head_dim = c / heads_;
    std::vector<float> x(m * c, 0.0f), normed(m * c), qkv(m * 3 * c), attended(m * c), mlp(m * mlp_width), out(m * c);
    std::vector<uint8_t> staging;
    for (int64_t s = 0; s < m; ++s) {
      add_row(wte_, tokens.data_ptr<int64_t>()[s], x.data() + s * c);
      add_row(wpe_, positions.data_ptr<int64_t>()[s], x.data() + s * c);
    }
    at::Tensor mlp_view = at::from_blob(mlp.data(), {m, mlp_width}, at::kFloat);
    for (const Block& b : blocks_) {
      layer_norm(x.data(), m, c, b.ln_1_weight, b.ln_1_bias, eps_, normed.data());
      b.qkv.apply(normed.data(), m, qkv.data(), staging);
      store_keys_and_values(b, qkv.data(), m, write_slots.data_ptr<int64_t>());
      PagedAttention a{qkv.data(), 3 * c, b.k_pool.data_ptr(), b.v_pool.data_ptr(), b.k_pool.scalar_type() == at::kBFloat16,
                       key_slot, lengths, m, heads_, head_dim, max_keys, b.band_width, 0, 0,
                       static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim))), attended.data()};
      for (int64_t s = 0; s < m; ++s) {
        const int64_t visible = lengths[s] - visible_begin(lengths[s], b.band_width);
        a.visible_keys += visible;
        a.most_visible = std::max(a.most_visible, visible);
      }
      paged_attention(a);
      b.attn_proj.apply(attended.data(), m, out.data(), staging);
      add_into(x.data(), out.data(), m * c);
      layer_norm(x.data(), m, c, b.ln_2_weight, b.ln_2_bias, eps_, normed.data());
      b.fc.apply(normed.data(), m, mlp.data(), staging);
      at::gelu_(mlp_view, gelu_approximate_);
      b.mlp_proj.apply(mlp.data(), m, out.data(), staging);
      add_into(x.data(), out.data(), m * c);
    }
    at::Tensor hidden = at::empty({m, c}, at::kFloat);
    layer_norm(x.data(), m, c, ln_f_weight_, ln_f_bias_, eps_, hidden.data_ptr<float>());
    return hidden.to(wte_.scalar_type());
  }

 private:
  int64_t width() const { return wte_.size(1); }

  // Keys (columns c .. 2c of q/k/v) and values (2c .. 3c) into the pools, in the pools' dtype.
  void store_keys_and_values(const Block& b, const float* qkv, int64_t m, const int64_t* slots) const {
    const int64_t c = width();
    if (b.k_pool.scalar_type() == at::kFloat) {
      store_rows(qkv + c, 3 * c, m, c, slots, b.k_pool.data_ptr<float>());
      store_rows(qkv + 2 * c, 3 * c, m, c, slots, b.v_pool.data_ptr<float>());
    } else {
      store_rows(qkv + c, 3 * c, m, c, slots, b.k_pool.data_ptr<c10::BFloat16>());
      store_rows(qkv + 2 * c, 3 * c, m, c, slots, b.v_pool.data_ptr<c10::BFloat16>());
    }
  }

  at::Tensor wte_, wpe_, ln_f_weight_, ln_f_bias_;
  double eps_;
  int64_t heads_;
  std::string gelu_approximate_;
  std::vector<Block> blocks_;
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(gptstack, m) {
  m.class_<DecodeStack>("DecodeStack")
      .def(torch::init<at::Tensor, at::Tensor, at::Tensor, at::Tensor, double, int64_t, std::string>())
      .def("add_block", &DecodeStack::add_block)
      .def("forward", &DecodeStack::forward);
}

}  // namespace gptstack
