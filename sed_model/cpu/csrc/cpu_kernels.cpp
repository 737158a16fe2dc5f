// Fused CPU kernels for SED's decoder in float32 inference (see sed_model/cpu/kernels.py).
//
// Each kernel does in one or two passes over memory what PyTorch does in five to eight: the
// decoder's class attention, GroupNorm + ReLU and narrow MLPs run on tensors of 10-40 MB per chunk
// whose elementwise passes are bound by memory bandwidth. The arithmetic is the layers' own, in
// another order (float32 throughout; GroupNorm's moments in double; erf to within 5e-7).
//
// Vectors are GCC/Clang vector extensions, so the same source compiles for any x86-64 level (and
// other architectures); the build picks the host's instruction set.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

typedef float v8f __attribute__((vector_size(32)));
typedef int v8i __attribute__((vector_size(32)));

// Unaligned vector loads and stores of any width.
template <typename V>
inline V load_as(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename V>
inline void store_as(float* p, V v) {
  std::memcpy(p, &v, sizeof(v));
}

inline v8f load8(const float* p) { return load_as<v8f>(p); }

inline void store8(float* p, v8f v) { store_as(p, v); }

inline v8f splat(float x) { return v8f{x, x, x, x, x, x, x, x}; }

// The products' vectors (the micro-kernel below, its activations and its stores): the widest the
// build's instruction set has. With AVX-512 they are 16 floats, which doubles the multiplications
// per instruction on CPUs whose FMA units are 512 bits wide (AMD EPYC with AVX-512: oneDNN's 3x3 convolution
// reaches ~500 GFLOP/s on two cores, the 8-float kernels half of that); the memory-bound kernels
// keep 8-float vectors, which every SED channel count divides.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
static_assert(16 % kLanes == 0, "the kernels' widths are multiples of 16 floats");
typedef float vwf __attribute__((vector_size(4 * kLanes)));

inline vwf loadw(const float* p) { return load_as<vwf>(p); }

inline void storew(float* p, vwf v) { store_as(p, v); }

template <typename V>
inline V splat_as(float x) {
  return x - V{};  // a broadcast: x - 0 is x for every x (x + 0 is not for x = -0, so it would be computed)
}

// A float buffer aligned to a cache line, so that no vector load or store of a multiple of 8
// floats from its start straddles two lines (std::vector's 16-byte alignment splits every other one).
class AlignedFloats {
 public:
  explicit AlignedFloats(size_t count) : data_(static_cast<float*>(std::aligned_alloc(64, (count * sizeof(float) + 63) / 64 * 64))) {
    TORCH_CHECK(data_ != nullptr || count == 0, "out of memory for a kernel buffer of ", count, " floats");
  }
  AlignedFloats(const AlignedFloats&) = delete;
  AlignedFloats& operator=(const AlignedFloats&) = delete;
  ~AlignedFloats() { std::free(data_); }
  float* data() { return data_; }

 private:
  float* data_;
};

inline float hsum(v8f v) { return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7])); }

// exp(x) for x <= 0 (Cephes' single-precision polynomial, about 1 ulp); below -87 it returns
// exp(-87) ~ 1.6e-38, which is 0 next to the 1 that elu + 1 adds for positive inputs.
inline v8f exp_nonpositive(v8f x) {
  x = x < splat(-87.0f) ? splat(-87.0f) : x;
  const v8f magic = splat(12582912.0f);  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  v8f n = (x * splat(1.44269504088896341f) + magic) - magic;
  v8f r = x - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  v8f p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * (r * r) + r + splat(1.0f);
  v8i bits = (__builtin_convertvector(n, v8i) + 127) << 23;
  return p * (v8f)bits;
}

// Linear attention's feature map, elu(x) + 1.
inline v8f elu_plus_one(v8f x) { return x > splat(0.0f) ? x + splat(1.0f) : exp_nonpositive(x); }

inline float elu_plus_one(float x) { return x > 0.0f ? x + 1.0f : std::exp(std::max(x, -87.0f)); }

void check_rows(const at::Tensor& t, const char* name, int64_t n, int64_t l, int64_t d) {
  TORCH_CHECK(t.dim() == 3 && t.size(0) == n && t.size(1) == l && t.size(2) == d, name, ": expected (", n, ", ", l, ", ", d,
              "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.device().is_cpu(), name,
              ": expected a contiguous float32 CPU tensor");
}

void check_sums(const at::Tensor& kv, const at::Tensor& k_sum, int64_t l, int64_t d) {
  TORCH_CHECK(kv.dim() == 3 && kv.size(0) == l && kv.size(1) == d && kv.size(2) == d, "kv: expected (", l, ", ", d, ", ", d,
              "), got ", kv.sizes());
  TORCH_CHECK(k_sum.dim() == 2 && k_sum.size(0) == l && k_sum.size(1) == d, "k_sum: expected (", l, ", ", d, "), got ",
              k_sum.sizes());
  for (const at::Tensor* t : {&kv, &k_sum}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->device().is_cpu(),
                "class sums: expected contiguous float32 CPU tensors");
  }
}

// Positions x heads per task: the rows' slices of a block are contiguous runs for the prefetcher,
// and the block's sums (at most 128 KB for d = 32) stay in cache while every row passes.
constexpr int64_t kHeadBlock = 32;

// body(n, l) for every row n and head l: threads take blocks of heads, each block's rows in turn.
template <typename Body>
void for_rows_by_head_block(int64_t n_rows, int64_t heads_total, Body&& body) {
  at::parallel_for(0, heads_total, kHeadBlock, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; block += kHeadBlock) {
      const int64_t block_end = std::min(block + kHeadBlock, end);
      for (int64_t n = 0; n < n_rows; ++n) {
        for (int64_t l = block; l < block_end; ++l) body(n, l);
      }
    }
  });
}

// kv[l] += sum_n phi(k[n, l]) v[n, l]^T, k_sum[l] += sum_n phi(k[n, l]); VD vectors of 8 per head.
template <int VD>
void class_sums_vec(const float* k, const float* v, float* kv, float* k_sum, int64_t n_rows, int64_t heads_total) {
  constexpr int D = VD * 8;
  for_rows_by_head_block(n_rows, heads_total, [&](int64_t n, int64_t l) {
    const float* kr = k + (n * heads_total + l) * D;
    const float* vr = v + (n * heads_total + l) * D;
    float* kvl = kv + l * D * D;
    v8f phi[VD], vv[VD];
    for (int j = 0; j < VD; ++j) {
      phi[j] = elu_plus_one(load8(kr + 8 * j));
      vv[j] = load8(vr + 8 * j);
      store8(k_sum + l * D + 8 * j, load8(k_sum + l * D + 8 * j) + phi[j]);
    }
    for (int i = 0; i < D; ++i) {
      const v8f p = splat(phi[i / 8][i % 8]);
      for (int j = 0; j < VD; ++j) store8(kvl + i * D + 8 * j, load8(kvl + i * D + 8 * j) + p * vv[j]);
    }
  });
}

void class_sums_scalar(const float* k, const float* v, float* kv, float* k_sum, int64_t n_rows, int64_t heads_total, int64_t d) {
  at::parallel_for(0, heads_total, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> phi(d);
    for (int64_t l = begin; l < end; ++l) {
      for (int64_t n = 0; n < n_rows; ++n) {
        const float* kr = k + (n * heads_total + l) * d;
        const float* vr = v + (n * heads_total + l) * d;
        for (int64_t i = 0; i < d; ++i) {
          phi[i] = elu_plus_one(kr[i]);
          k_sum[l * d + i] += phi[i];
        }
        for (int64_t i = 0; i < d; ++i)
          for (int64_t j = 0; j < d; ++j) kv[(l * d + i) * d + j] += phi[i] * vr[j];
      }
    }
  });
}

void linear_attention_sums_(const at::Tensor& k, const at::Tensor& v, at::Tensor& kv, at::Tensor& k_sum) {
  const int64_t n = k.size(0), l = k.size(1), d = k.size(2);
  check_rows(k, "k", n, l, d);
  check_rows(v, "v", n, l, d);
  check_sums(kv, k_sum, l, d);
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* kvp = kv.data_ptr<float>();
  float* ksp = k_sum.data_ptr<float>();
  switch (d) {
    case 8: return class_sums_vec<1>(kp, vp, kvp, ksp, n, l);
    case 16: return class_sums_vec<2>(kp, vp, kvp, ksp, n, l);
    case 32: return class_sums_vec<4>(kp, vp, kvp, ksp, n, l);
    default: return class_sums_scalar(kp, vp, kvp, ksp, n, l, d);
  }
}

// out[n, l] = residual[n, l] + phi(q[n, l]) kv[l] / (phi(q[n, l]) . k_sum[l] + eps).
template <int VD>
void attention_vec(const float* q, const float* kv, const float* k_sum, const float* residual, float* out, int64_t n_rows,
                   int64_t heads_total, float eps) {
  constexpr int D = VD * 8;
  for_rows_by_head_block(n_rows, heads_total, [&](int64_t n, int64_t l) {
    const float* kvl = kv + l * D * D;
    const int64_t offset = (n * heads_total + l) * D;
    v8f phi[VD], num[VD];
    v8f den = splat(0.0f);
    for (int j = 0; j < VD; ++j) {
      phi[j] = elu_plus_one(load8(q + offset + 8 * j));
      den += phi[j] * load8(k_sum + l * D + 8 * j);
      num[j] = splat(0.0f);
    }
    for (int i = 0; i < D; ++i) {
      const v8f p = splat(phi[i / 8][i % 8]);
      for (int j = 0; j < VD; ++j) num[j] += p * load8(kvl + i * D + 8 * j);
    }
    const v8f denominator = splat(hsum(den) + eps);
    for (int j = 0; j < VD; ++j) store8(out + offset + 8 * j, load8(residual + offset + 8 * j) + num[j] / denominator);
  });
}

void attention_scalar(const float* q, const float* kv, const float* k_sum, const float* residual, float* out, int64_t n_rows,
                      int64_t heads_total, int64_t d, float eps) {
  at::parallel_for(0, heads_total, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> phi(d);
    for (int64_t l = begin; l < end; ++l) {
      for (int64_t n = 0; n < n_rows; ++n) {
        const int64_t offset = (n * heads_total + l) * d;
        float den = 0.0f;
        for (int64_t i = 0; i < d; ++i) {
          phi[i] = elu_plus_one(q[offset + i]);
          den += phi[i] * k_sum[l * d + i];
        }
        den += eps;
        for (int64_t j = 0; j < d; ++j) {
          float num = 0.0f;
          for (int64_t i = 0; i < d; ++i) num += phi[i] * kv[(l * d + i) * d + j];
          out[offset + j] = residual[offset + j] + num / den;
        }
      }
    }
  });
}

at::Tensor linear_attention(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& k_sum, const at::Tensor& residual, double eps) {
  const int64_t n = q.size(0), l = q.size(1), d = q.size(2);
  check_rows(q, "q", n, l, d);
  check_rows(residual, "residual", n, l, d);
  check_sums(kv, k_sum, l, d);
  at::Tensor out = at::empty({n, l, d}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kvp = kv.data_ptr<float>();
  const float* ksp = k_sum.data_ptr<float>();
  const float* rp = residual.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float e = static_cast<float>(eps);
  switch (d) {
    case 8: attention_vec<1>(qp, kvp, ksp, rp, op, n, l, e); break;
    case 16: attention_vec<2>(qp, kvp, ksp, rp, op, n, l, e); break;
    case 32: attention_vec<4>(qp, kvp, ksp, rp, op, n, l, e); break;
    default: attention_scalar(qp, kvp, ksp, rp, op, n, l, d, e);
  }
  return out;
}

// out = relu(group_norm(x + add)) for channels-last maps viewed as (N, positions, C); `add` is
// (positions, C) and the same for every row, or undefined. `out` may be `x`. `moments`, if given,
// are x's per row and channel (N, 2, C) sums and sums of squares in double (x + add's, if `add`),
// as the Winograd kernel makes them: then one pass over x instead of two.
void group_norm_relu(const at::Tensor& x, const std::optional<at::Tensor>& add, int64_t groups, const at::Tensor& weight,
                     const at::Tensor& bias, double eps, at::Tensor& out, const std::optional<at::Tensor>& moments) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "x: expected a contiguous float32 CPU tensor (rows, positions, channels), got ", x.sizes());
  const int64_t n_rows = x.size(0), positions = x.size(1), channels = x.size(2);
  TORCH_CHECK(groups > 0 && channels % groups == 0, "group_norm_relu: ", channels, " channels in ", groups, " groups");
  TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == at::kFloat && out.is_contiguous(), "out: expected ", x.sizes());
  TORCH_CHECK(weight.numel() == channels && bias.numel() == channels && weight.is_contiguous() && bias.is_contiguous() &&
                  weight.scalar_type() == at::kFloat && bias.scalar_type() == at::kFloat,
              "group_norm_relu: weight and bias of ", channels, " float32 values expected");
  const float* ap = nullptr;
  if (add.has_value() && add->defined()) {
    TORCH_CHECK(add->numel() == positions * channels && add->is_contiguous() && add->scalar_type() == at::kFloat,
                "add: expected ", positions, " x ", channels, " contiguous float32 values");
    ap = add->data_ptr<float>();
  }
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t per_group = channels / groups;
  const double* mp = nullptr;
  if (moments.has_value() && moments->defined()) {
    TORCH_CHECK(moments->dim() == 3 && moments->size(0) == n_rows && moments->size(1) == 2 && moments->size(2) == channels &&
                    moments->scalar_type() == at::kDouble && moments->is_contiguous(),
                "moments: expected contiguous float64 (", n_rows, ", 2, ", channels, "), got ", moments->sizes());
    mp = moments->data_ptr<double>();
  }
  // Per row and channel: the affine map that GroupNorm + its weight and bias amount to.
  std::vector<float> scale(n_rows * channels), shift(n_rows * channels);
  at::parallel_for(0, n_rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> sum(channels), squares(channels);
    for (int64_t n = begin; n < end; ++n) {
      std::fill(sum.begin(), sum.end(), 0.0);
      std::fill(squares.begin(), squares.end(), 0.0);
      if (mp) {
        std::copy(mp + n * 2 * channels, mp + n * 2 * channels + channels, sum.begin());
        std::copy(mp + n * 2 * channels + channels, mp + (n + 1) * 2 * channels, squares.begin());
      } else {
        const float* row = xp + n * positions * channels;
        for (int64_t p = 0; p < positions; ++p) {
          const float* in = row + p * channels;
          if (ap) {
            const float* extra = ap + p * channels;
            for (int64_t c = 0; c < channels; ++c) {
              const double value = in[c] + extra[c];
              sum[c] += value;
              squares[c] += value * value;
            }
          } else {
            for (int64_t c = 0; c < channels; ++c) {
              const double value = in[c];
              sum[c] += value;
              squares[c] += value * value;
            }
          }
        }
      }
      for (int64_t g = 0; g < groups; ++g) {
        double s = 0.0, s2 = 0.0;
        for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
          s += sum[c];
          s2 += squares[c];
        }
        const double count = static_cast<double>(positions * per_group);
        const double mean = s / count;
        const double variance = std::max(s2 / count - mean * mean, 0.0);
        const double rstd = 1.0 / std::sqrt(variance + eps);
        for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
          const double a = rstd * weight.data_ptr<float>()[c];
          scale[n * channels + c] = static_cast<float>(a);
          shift[n * channels + c] = static_cast<float>(bias.data_ptr<float>()[c] - mean * a);
        }
      }
    }
  });
  const int64_t total = n_rows * positions;
  at::parallel_for(0, total, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / positions, p = i % positions;
      const float* a = scale.data() + n * channels;
      const float* b = shift.data() + n * channels;
      const float* in = xp + i * channels;
      float* o = op + i * channels;
      if (ap) {
        const float* extra = ap + p * channels;
        for (int64_t c = 0; c < channels; ++c) o[c] = std::max((in[c] + extra[c]) * a[c] + b[c], 0.0f);
      } else {
        for (int64_t c = 0; c < channels; ++c) o[c] = std::max(in[c] * a[c] + b[c], 0.0f);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// The decoder's MLPs: out = residual + scale * (act(x w1^T + b1) w2^T + b2), over row tiles whose
// hidden activation stays in cache (PyTorch writes it to memory and reads it back, 4x the
// input's size, and applies the activation in a pass of its own).

// Rows per tile: the hidden tile (48 x 4C floats) and the input tile stay in L1/L2.
constexpr int64_t kTileRows = 48;
constexpr int kMicroRows = 6;

// erf as a rational function of x (Eigen's and XLA's float erf; absolute error < 5e-7): no exp.
template <typename V>
inline V erf(V x) {
  x = x < splat_as<V>(-4.0f) ? splat_as<V>(-4.0f) : x;
  x = x > splat_as<V>(4.0f) ? splat_as<V>(4.0f) : x;
  const V x2 = x * x;
  V p = splat_as<V>(-2.72614225801306e-10f);
  p = p * x2 + splat_as<V>(2.77068142495902e-08f);
  p = p * x2 + splat_as<V>(-2.10102402082508e-06f);
  p = p * x2 + splat_as<V>(-5.69250639462346e-05f);
  p = p * x2 + splat_as<V>(-7.34990630326855e-04f);
  p = p * x2 + splat_as<V>(-2.95459980854025e-03f);
  p = p * x2 + splat_as<V>(-1.60960333262415e-02f);
  V q = splat_as<V>(-1.45660718464996e-05f);
  q = q * x2 + splat_as<V>(-2.13374055278905e-04f);
  q = q * x2 + splat_as<V>(-1.68282697438203e-03f);
  q = q * x2 + splat_as<V>(-7.37332916720468e-03f);
  q = q * x2 + splat_as<V>(-1.42647390514189e-02f);
  return x * p / q;
}

template <typename V>
inline V gelu(V x) { return splat_as<V>(0.5f) * x * (splat_as<V>(1.0f) + erf<V>(x * splat_as<V>(0.70710678118654752f))); }

template <typename V>
inline V relu(V x) { return x > splat_as<V>(0.0f) ? x : splat_as<V>(0.0f); }

// acc[r][v] = a[r, :k_len] . b[:k_len, NV vectors of columns] + bias, for MR rows (b's rows `ldb`
// apart). MR x NV accumulators hide the products' latency for MR = 6 and NV = 2; a one-vector
// panel sums even and odd k apart for as many independent chains.
template <int MR, int NV>
inline void micro_panel(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t k_len, const float* bias, vwf (&acc)[MR][NV]) {
  for (int v = 0; v < NV; ++v) {
    const vwf bias_v = loadw(bias + kLanes * v);
    for (int r = 0; r < MR; ++r) acc[r][v] = bias_v;
  }
  if constexpr (NV == 1) {
    vwf odd[MR];
    for (int r = 0; r < MR; ++r) odd[r] = vwf{};
    int64_t k = 0;
    for (; k + 1 < k_len; k += 2) {
      const vwf b0 = loadw(b + k * ldb), b1 = loadw(b + (k + 1) * ldb);
      for (int r = 0; r < MR; ++r) {
        acc[r][0] += splat_as<vwf>(a[r * lda + k]) * b0;
        odd[r] += splat_as<vwf>(a[r * lda + k + 1]) * b1;
      }
    }
    if (k < k_len) {
      const vwf b0 = loadw(b + k * ldb);
      for (int r = 0; r < MR; ++r) acc[r][0] += splat_as<vwf>(a[r * lda + k]) * b0;
    }
    for (int r = 0; r < MR; ++r) acc[r][0] += odd[r];
    return;
  }
  for (int64_t k = 0; k < k_len; ++k) {
    vwf bk[NV];
    for (int v = 0; v < NV; ++v) bk[v] = loadw(b + k * ldb + kLanes * v);
    for (int r = 0; r < MR; ++r) {
      const vwf ar = splat_as<vwf>(a[r * lda + k]);
      for (int v = 0; v < NV; ++v) acc[r][v] += ar * bk[v];
    }
  }
}

// body(nv, c) for the panels of `columns` (a multiple of 16) that micro_panel computes: two vectors
// wide, and one vector wide for the last 16 columns where 32-column panels do not divide them.
template <typename Body>
void for_column_panels(int64_t columns, Body&& body) {
  int64_t c = 0;
  for (; c + 2 * kLanes <= columns; c += 2 * kLanes) body(std::integral_constant<int, 2>{}, c);
  for (; c < columns; c += kLanes) body(std::integral_constant<int, 1>{}, c);
}

// Hidden columns j.. of MR rows (NV vectors).
template <int MR, int NV>
void hidden_panel(const float* x, int64_t k_len, const float* w1t, const float* b1, int64_t hidden, int64_t j, float* h, bool use_gelu) {
  vwf acc[MR][NV];
  micro_panel<MR, NV>(x, k_len, w1t + j, hidden, k_len, b1 + j, acc);
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) storew(h + r * hidden + j + kLanes * v, use_gelu ? gelu(acc[r][v]) : relu(acc[r][v]));
  }
}

// Output columns j.. of MR rows (NV vectors), with the layer scale and the residual.
template <int MR, int NV>
void output_panel(const float* h, int64_t hidden, const float* w2t, const float* b2, int64_t channels, int64_t j, const float* residual,
                  const float* scale, float* out) {
  vwf acc[MR][NV];
  micro_panel<MR, NV>(h, hidden, w2t + j, channels, hidden, b2 + j, acc);
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) {
      const int64_t at = r * channels + j + kLanes * v;
      vwf y = acc[r][v];
      if (scale) y = y * loadw(scale + j + kLanes * v);
      if (residual) y = y + loadw(residual + at);
      storew(out + at, y);
    }
  }
}

template <typename Body>
void for_micro_rows(int64_t rows, Body&& body) {
  int64_t r = 0;
  for (; r + kMicroRows <= rows; r += kMicroRows) body(std::integral_constant<int, kMicroRows>{}, r);
  switch (rows - r) {
    case 5: body(std::integral_constant<int, 5>{}, r); break;
    case 4: body(std::integral_constant<int, 4>{}, r); break;
    case 3: body(std::integral_constant<int, 3>{}, r); break;
    case 2: body(std::integral_constant<int, 2>{}, r); break;
    case 1: body(std::integral_constant<int, 1>{}, r); break;
    default: break;
  }
}

// LayerNorm over each of `rows` rows of `k_len` values (PyTorch's: biased variance, eps inside the
// root), 8 channels per vector (the sums in eight partial sums; a scalar tail past the last 8).
void layer_norm_rows(const float* x, int64_t rows, int64_t k_len, const float* weight, const float* bias, float eps, float* out) {
  const int64_t vector_end = k_len / 8 * 8;
  for (int64_t r = 0; r < rows; ++r) {
    const float* in = x + r * k_len;
    v8f partial = splat(0.0f);
    for (int64_t k = 0; k < vector_end; k += 8) partial += load8(in + k);
    float sum = hsum(partial);
    for (int64_t k = vector_end; k < k_len; ++k) sum += in[k];
    const float mean = sum / static_cast<float>(k_len);
    partial = splat(0.0f);
    for (int64_t k = 0; k < vector_end; k += 8) {
      const v8f centred = load8(in + k) - splat(mean);
      partial += centred * centred;
    }
    float squares = hsum(partial);
    for (int64_t k = vector_end; k < k_len; ++k) squares += (in[k] - mean) * (in[k] - mean);
    const float rstd = 1.0f / std::sqrt(squares / static_cast<float>(k_len) + eps);
    float* normed = out + r * k_len;
    for (int64_t k = 0; k < vector_end; k += 8) {
      store8(normed + k, (load8(in + k) - splat(mean)) * splat(rstd) * load8(weight + k) + load8(bias + k));
    }
    for (int64_t k = vector_end; k < k_len; ++k) normed[k] = (in[k] - mean) * rstd * weight[k] + bias[k];
  }
}

void pointwise_mlp(const at::Tensor& x, const std::optional<at::Tensor>& norm_weight, const std::optional<at::Tensor>& norm_bias,
                   double norm_eps, const at::Tensor& w1t, const at::Tensor& b1, const at::Tensor& w2t, const at::Tensor& b2,
                   const std::string& activation, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& scale,
                   at::Tensor& out) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "x: expected contiguous float32 CPU rows (positions, channels), got ", x.sizes());
  const int64_t rows = x.size(0), k_len = x.size(1);
  TORCH_CHECK(w1t.dim() == 2 && w1t.size(0) == k_len && w1t.is_contiguous() && w1t.scalar_type() == at::kFloat,
              "w1t: expected (", k_len, ", hidden), got ", w1t.sizes());
  const int64_t hidden = w1t.size(1);
  TORCH_CHECK(w2t.dim() == 2 && w2t.size(0) == hidden && w2t.is_contiguous() && w2t.scalar_type() == at::kFloat,
              "w2t: expected (", hidden, ", channels), got ", w2t.sizes());
  const int64_t channels = w2t.size(1);
  TORCH_CHECK(hidden % 16 == 0 && channels % 16 == 0, "pointwise_mlp: widths must be multiples of 16, got ", hidden, " and ", channels);
  TORCH_CHECK(b1.numel() == hidden && b2.numel() == channels && b1.is_contiguous() && b2.is_contiguous() &&
                  b1.scalar_type() == at::kFloat && b2.scalar_type() == at::kFloat,
              "pointwise_mlp: biases of ", hidden, " and ", channels, " float32 values expected");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == rows && out.size(1) == channels && out.is_contiguous() && out.scalar_type() == at::kFloat,
              "out: expected (", rows, ", ", channels, ")");
  TORCH_CHECK(activation == "gelu" || activation == "relu", "pointwise_mlp: activation must be gelu or relu, got ", activation);
  const float* rp = nullptr;
  if (residual.has_value() && residual->defined()) {
    TORCH_CHECK(residual->sizes() == out.sizes() && residual->is_contiguous() && residual->scalar_type() == at::kFloat,
                "residual: expected (", rows, ", ", channels, ")");
    rp = residual->data_ptr<float>();
  }
  const float* sp = nullptr;
  if (scale.has_value() && scale->defined()) {
    TORCH_CHECK(scale->numel() == channels && scale->is_contiguous() && scale->scalar_type() == at::kFloat,
                "scale: expected ", channels, " float32 values");
    sp = scale->data_ptr<float>();
  }
  const float *nwp = nullptr, *nbp = nullptr;
  if (norm_weight.has_value() && norm_weight->defined()) {
    TORCH_CHECK(norm_bias.has_value() && norm_bias->defined() && norm_weight->numel() == k_len && norm_bias->numel() == k_len &&
                    norm_weight->is_contiguous() && norm_bias->is_contiguous() && norm_weight->scalar_type() == at::kFloat &&
                    norm_bias->scalar_type() == at::kFloat,
                "norm: expected a weight and a bias of ", k_len, " float32 values");
    nwp = norm_weight->data_ptr<float>();
    nbp = norm_bias->data_ptr<float>();
  }
  const bool use_gelu = activation == "gelu";
  const float eps = static_cast<float>(norm_eps);
  const float *xp = x.data_ptr<float>(), *w1p = w1t.data_ptr<float>(), *b1p = b1.data_ptr<float>();
  const float *w2p = w2t.data_ptr<float>(), *b2p = b2.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t tiles = (rows + kTileRows - 1) / kTileRows;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    AlignedFloats h(kTileRows * hidden), normed(nwp ? kTileRows * k_len : 0);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t first = tile * kTileRows, count = std::min(kTileRows, rows - first);
      // The tile's inputs, normalised first if asked: read before any of its rows is written (`out`
      // may be `residual`, which may be `x`).
      const float* input = xp + first * k_len;
      if (nwp) {
        layer_norm_rows(input, count, k_len, nwp, nbp, eps, normed.data());
        input = normed.data();
      }
      // Weight panels outside, row blocks inside: each 16-column panel is read from memory once
      // per tile and stays in L1 while the tile's rows pass.
      for_column_panels(hidden, [&](auto nv, int64_t j) {
        for_micro_rows(count, [&](auto mr, int64_t r) {
          hidden_panel<decltype(mr)::value, decltype(nv)::value>(input + r * k_len, k_len, w1p, b1p, hidden, j, h.data() + r * hidden,
                                                                 use_gelu);
        });
      });
      for_column_panels(channels, [&](auto nv, int64_t j) {
        for_micro_rows(count, [&](auto mr, int64_t r) {
          const int64_t at = (first + r) * channels;
          output_panel<decltype(mr)::value, decltype(nv)::value>(h.data() + r * hidden, hidden, w2p, b2p, channels, j,
                                                                 rp ? rp + at : nullptr, sp, op + at);
        });
      });
    }
  });
}

// ---------------------------------------------------------------------------------------------
// The heads: a 3x3 convolution (padding 1) from C channels to one, on channels-last maps viewed as
// (N, H, W, C). oneDNN has no fast kernel for a single output channel (measured: 2-5 GB/s here).
at::Tensor single_channel_conv3x3(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "x: expected a contiguous float32 CPU tensor (N, H, W, C), got ", x.sizes());
  const int64_t n_rows = x.size(0), height = x.size(1), width = x.size(2), channels = x.size(3);
  TORCH_CHECK(channels % 8 == 0, "single_channel_conv3x3: channels must be a multiple of 8, got ", channels);
  TORCH_CHECK(weight.dim() == 3 && weight.size(0) == 3 && weight.size(1) == 3 && weight.size(2) == channels && weight.is_contiguous() &&
                  weight.scalar_type() == at::kFloat,
              "weight: expected (3, 3, ", channels, "), got ", weight.sizes());
  TORCH_CHECK(bias.numel() == 1 && bias.scalar_type() == at::kFloat, "bias: expected one float32 value");
  at::Tensor out = at::empty({n_rows, 1, height, width}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>();
  const float b = bias.data_ptr<float>()[0];
  float* op = out.data_ptr<float>();
  const int64_t vectors = channels / 8;
  at::parallel_for(0, n_rows * height, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / height, y = row % height;
      // `count` outputs from column x0 on, each with its own accumulator (one chain of products
      // each, in the same order whatever `count`): several chains hide the products' latency.
      // `checked`: the window reaches past the map's left or right border.
      auto outputs = [&](int64_t x0, auto count, bool checked) {
        constexpr int kCount = decltype(count)::value;
        v8f acc[kCount];
        for (int j = 0; j < kCount; ++j) acc[j] = splat(0.0f);
        for (int dy = -1; dy <= 1; ++dy) {
          if (y + dy < 0 || y + dy >= height) continue;
          const float* in_row = xp + (n * height + y + dy) * width * channels;
          for (int dx = -1; dx <= 1; ++dx) {
            const float* w = wp + ((dy + 1) * 3 + dx + 1) * channels;
            for (int64_t v = 0; v < vectors; ++v) {
              const v8f wv = load8(w + 8 * v);
              for (int j = 0; j < kCount; ++j) {
                const int64_t column = x0 + j + dx;
                if (checked && (column < 0 || column >= width)) continue;
                acc[j] += load8(in_row + column * channels + 8 * v) * wv;
              }
            }
          }
        }
        for (int j = 0; j < kCount; ++j) op[row * width + x0 + j] = hsum(acc[j]) + b;
      };
      constexpr int kBlock = 8;
      int64_t x0 = 0;
      outputs(x0++, std::integral_constant<int, 1>{}, true);
      for (; x0 + kBlock < width; x0 += kBlock) outputs(x0, std::integral_constant<int, kBlock>{}, false);
      for (; x0 < width; ++x0) outputs(x0, std::integral_constant<int, 1>{}, true);
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// A 2x2 transposed convolution with stride 2 (optionally + ReLU) written into a given channels-last
// map: the up-stages' up-sampling, into memory the decoder keeps for all chunks. Each input pixel
// is one row of a product with the (C_in, 2 x 2 x C_out) weight.
void transposed_conv2x2_into(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, bool apply_relu, at::Tensor& out) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "x: expected a contiguous float32 CPU tensor (N, H, W, C), got ", x.sizes());
  const int64_t n_rows = x.size(0), height = x.size(1), width = x.size(2), k_len = x.size(3);
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == k_len && weight.size(1) % 16 == 0 && weight.is_contiguous() &&
                  weight.scalar_type() == at::kFloat,
              "weight: expected (", k_len, ", 4 x C_out) with C_out a multiple of 4, got ", weight.sizes());
  const int64_t columns = weight.size(1), out_channels = columns / 4;
  TORCH_CHECK(bias.numel() == columns && bias.is_contiguous() && bias.scalar_type() == at::kFloat, "bias: expected ", columns, " values");
  TORCH_CHECK(out.dim() == 4 && out.size(0) == n_rows && out.size(1) == 2 * height && out.size(2) == 2 * width &&
                  out.size(3) == out_channels && out.scalar_type() == at::kFloat && out.is_contiguous(),
              "out: expected a contiguous (", n_rows, ", ", 2 * height, ", ", 2 * width, ", ", out_channels, ") tensor, got ", out.sizes());
  const float *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>(), *bp = bias.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n_rows * height, 1, [&](int64_t begin, int64_t end) {
    AlignedFloats products(kMicroRows * columns);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / height, i = row % height;
      for (int64_t j0 = 0; j0 < width; j0 += kMicroRows) {
        const int64_t count = std::min<int64_t>(kMicroRows, width - j0);
        for_micro_rows(count, [&](auto mr, int64_t r) {
          constexpr int MR = decltype(mr)::value;
          for_column_panels(columns, [&](auto nv, int64_t c) {
            constexpr int NV = decltype(nv)::value;
            vwf acc[MR][NV];
            micro_panel<MR, NV>(xp + (row * width + j0 + r) * k_len, k_len, wp + c, columns, k_len, bp + c, acc);
            for (int q = 0; q < MR; ++q) {
              for (int v = 0; v < NV; ++v) {
                storew(products.data() + (r + q) * columns + c + kLanes * v, apply_relu ? relu(acc[q][v]) : acc[q][v]);
              }
            }
          });
        });
        for (int64_t q = 0; q < count; ++q) {
          for (int a = 0; a < 2; ++a) {
            for (int b = 0; b < 2; ++b) {
              float* target = op + ((n * 2 * height + 2 * i + a) * 2 * width + 2 * (j0 + q) + b) * out_channels;
              const float* source = products.data() + q * columns + (a * 2 + b) * out_channels;
              int64_t c = 0;
              for (; c + 8 <= out_channels; c += 8) store8(target + c, load8(source + c));
              for (; c < out_channels; ++c) target[c] = source[c];
            }
          }
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// 3x3 convolutions (padding 1, no bias) by Winograd's F(4x4, 3x3): each 4x4 output tile is
// A^T [sum_c U_c (.) (B^T d_c B)] A over 6x6 input tiles d_c, with U_c = G g_c G^T the transformed
// weights (`u`, (36, C_in, C_out), made by the caller). 36 products of (tiles x C_in) by
// (C_in x C_out) replace the direct convolution's 144 multiplications per tile; the transforms'
// coefficients (up to 8 in A, 5 in B, 1/24 in G) round about 10x more than the direct kernel. The
// input may be the channel concatenation of two maps, read where they are (the decoder's fusion
// conv: the up-sampled map and the correlation guidance, never copied into one). It may add a map
// that is the same for every row (the appearance term) and take the per row and channel moments
// (sum, sum of squares) of what it writes, for the GroupNorm that follows (`group_norm_relu`).
constexpr int kWinogradTiles = kMicroRows;

// B^T e for the six values of one row or column of an input tile.
template <typename V>
inline void winograd_input_transform(const V (&e)[6], V (&out)[6]) {
  const V a = e[4] - 4.0f * e[2], b = e[3] - 4.0f * e[1];
  const V c = e[4] - e[2], d = 2.0f * (e[3] - e[1]);
  out[0] = 4.0f * e[0] - 5.0f * e[2] + e[4];
  out[1] = a + b;
  out[2] = a - b;
  out[3] = c + d;
  out[4] = c - d;
  out[5] = 4.0f * e[1] - 5.0f * e[3] + e[5];
}

// A^T e (four values) for the six values of one row or column of a product tile.
template <typename V>
inline void winograd_output_transform(const V (&e)[6], V (&out)[4]) {
  const V p = e[1] + e[2], n = e[1] - e[2], pp = e[3] + e[4], nn = e[3] - e[4];
  out[0] = e[0] + p + pp;
  out[1] = n + 2.0f * nn;
  out[2] = p + 4.0f * pp;
  out[3] = n + 8.0f * nn + e[5];
}

// One map a 3x3 convolution reads: the convolution's input is the channel concatenation of one
// or two of them (channels-last, the same height and width).
struct ConvInput {
  const float* data;
  int64_t channels;
};

// B^T d B for the channels c0.. (one vector V of them) of the 6x6 input tile at (top, left) of map
// `x` (zero outside it), into v[xi * v_stride] for xi = 6 * row + column.
template <typename V>
inline void winograd_input_channels(const float* x, int64_t channels, int64_t c0, int64_t height, int64_t width, int64_t n, int64_t top,
                                    int64_t left, bool inside, float* v, int64_t v_stride) {
  // Columns first (B^T d), each column's inputs dead before the next is loaded, then rows.
  V t[6][6];
  for (int q = 0; q < 6; ++q) {
    V column[6], transformed[6];
    for (int r = 0; r < 6; ++r) {
      const int64_t y = top + r, xx = left + q;
      const bool in_map = inside || (y >= 0 && y < height && xx >= 0 && xx < width);
      column[r] = in_map ? load_as<V>(x + ((n * height + y) * width + xx) * channels + c0) : V{};
    }
    winograd_input_transform(column, transformed);
    for (int r = 0; r < 6; ++r) t[r][q] = transformed[r];
  }
  for (int r = 0; r < 6; ++r) {
    V transformed[6];
    winograd_input_transform(t[r], transformed);
    for (int q = 0; q < 6; ++q) store_as(v + (6 * r + q) * v_stride + c0, transformed[q]);
  }
}

inline void winograd_input_tile(const ConvInput* parts, int n_parts, int64_t height, int64_t width, int64_t n, int64_t top, int64_t left,
                                float* v, int64_t v_stride) {
  // v[xi * v_stride + c] for xi = 6 * row + column of B^T d B, c over the parts' channels in turn:
  // wide vectors of channels, then 8 at a time for the rest (the parts' widths are multiples of 8).
  const bool inside = top >= 0 && top + 6 <= height && left >= 0 && left + 6 <= width;
  for (int part = 0; part < n_parts; ++part) {
    const float* x = parts[part].data;
    const int64_t channels = parts[part].channels;
    int64_t c0 = 0;
    for (; c0 + kLanes <= channels; c0 += kLanes) {
      winograd_input_channels<vwf>(x, channels, c0, height, width, n, top, left, inside, v, v_stride);
    }
    for (; c0 < channels; c0 += 8) winograd_input_channels<v8f>(x, channels, c0, height, width, n, top, left, inside, v, v_stride);
    v += channels;
  }
}

at::Tensor winograd_conv3x3(const at::Tensor& x, const std::optional<at::Tensor>& x2, const at::Tensor& u, const std::optional<at::Tensor>& add,
                            const std::optional<at::Tensor>& moments) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "x: expected a contiguous float32 CPU tensor (N, H, W, C), got ", x.sizes());
  const int64_t n_rows = x.size(0), height = x.size(1), width = x.size(2);
  TORCH_CHECK(height % 4 == 0 && width % 4 == 0 && x.size(3) % 8 == 0,
              "winograd_conv3x3: sizes that are multiples of 4 and a multiple of 8 channels expected, got ", x.sizes());
  ConvInput parts[2] = {{x.data_ptr<float>(), x.size(3)}, {nullptr, 0}};
  int n_parts = 1;
  if (x2.has_value() && x2->defined()) {
    TORCH_CHECK(x2->dim() == 4 && x2->size(0) == n_rows && x2->size(1) == height && x2->size(2) == width && x2->size(3) % 8 == 0 &&
                    x2->scalar_type() == at::kFloat && x2->is_contiguous(),
                "x2: expected a contiguous float32 tensor (", n_rows, ", ", height, ", ", width, ", C) with C a multiple of 8, got ",
                x2->sizes());
    parts[1] = {x2->data_ptr<float>(), x2->size(3)};
    n_parts = 2;
  }
  const int64_t in_channels = parts[0].channels + parts[1].channels;
  TORCH_CHECK(u.dim() == 3 && u.size(0) == 36 && u.size(1) == in_channels && u.size(2) % 16 == 0 && u.is_contiguous() &&
                  u.scalar_type() == at::kFloat,
              "u: expected (36, ", in_channels, ", C_out) with C_out a multiple of 16, got ", u.sizes());
  const int64_t out_channels = u.size(2);
  const float* ap = nullptr;
  if (add.has_value() && add->defined()) {
    TORCH_CHECK(add->numel() == height * width * out_channels && add->is_contiguous() && add->scalar_type() == at::kFloat,
                "add: expected ", height, " x ", width, " x ", out_channels, " contiguous float32 values (H, W, C_out)");
    ap = add->data_ptr<float>();
  }
  double* mp = nullptr;
  if (moments.has_value() && moments->defined()) {
    TORCH_CHECK(moments->dim() == 3 && moments->size(0) == n_rows && moments->size(1) == 2 && moments->size(2) == out_channels &&
                    moments->scalar_type() == at::kDouble && moments->is_contiguous(),
                "moments: expected contiguous float64 (", n_rows, ", 2, ", out_channels, "), got ", moments->sizes());
    mp = moments->data_ptr<double>();
  }
  at::Tensor out = at::empty({n_rows, height, width, out_channels}, x.options());
  const float* up = u.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t tile_rows = height / 4, tile_columns = width / 4;
  const std::vector<float> zeros(out_channels, 0.0f);
  // Each task's moments apart, summed in the order of the tasks' first rows afterwards: the same
  // result whichever thread finishes first.
  std::vector<std::pair<int64_t, std::vector<double>>> task_moments;
  std::mutex task_moments_mutex;
  at::parallel_for(0, n_rows * tile_rows, 1, [&](int64_t begin, int64_t end) {
    AlignedFloats v(36 * kWinogradTiles * in_channels), m(36 * kWinogradTiles * out_channels);
    std::vector<double> own_moments(mp ? n_rows * 2 * out_channels : 0, 0.0);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / tile_rows, ty = row % tile_rows;
      for (int64_t tx0 = 0; tx0 < tile_columns; tx0 += kWinogradTiles) {
        const int64_t count = std::min<int64_t>(kWinogradTiles, tile_columns - tx0);
        // v: (36, tiles, C_in); m: (36, tiles, C_out).
        for (int64_t q = 0; q < count; ++q) {
          winograd_input_tile(parts, n_parts, height, width, n, 4 * ty - 1, 4 * (tx0 + q) - 1, v.data() + q * in_channels,
                              kWinogradTiles * in_channels);
        }
        for (int xi = 0; xi < 36; ++xi) {
          const float* a = v.data() + xi * kWinogradTiles * in_channels;
          float* mx = m.data() + xi * kWinogradTiles * out_channels;
          for_micro_rows(count, [&](auto mr, int64_t r) {
            constexpr int MR = decltype(mr)::value;
            for_column_panels(out_channels, [&](auto nv, int64_t c) {
              constexpr int NV = decltype(nv)::value;
              vwf acc[MR][NV];
              micro_panel<MR, NV>(a + r * in_channels, in_channels, up + xi * in_channels * out_channels + c, out_channels, in_channels,
                                  zeros.data(), acc);
              for (int q = 0; q < MR; ++q) {
                for (int v = 0; v < NV; ++v) storew(mx + (r + q) * out_channels + c + kLanes * v, acc[q][v]);
              }
            });
          });
        }
        // y = A^T m A: columns first, then rows.
        for (int64_t q = 0; q < count; ++q) {
          for (int64_t c = 0; c < out_channels; c += kLanes) {
            vwf t[4][6];
            for (int k = 0; k < 6; ++k) {
              vwf column[6], transformed[4];
              for (int r = 0; r < 6; ++r) column[r] = loadw(m.data() + ((6 * r + k) * kWinogradTiles + q) * out_channels + c);
              winograd_output_transform(column, transformed);
              for (int r = 0; r < 4; ++r) t[r][k] = transformed[r];
            }
            vwf tile_sum{}, tile_squares{};  // over the tile's 16 outputs, then into double
            for (int r = 0; r < 4; ++r) {
              vwf transformed[4];
              winograd_output_transform(t[r], transformed);
              const int64_t position = (4 * ty + r) * width + 4 * (tx0 + q);
              float* target = op + (n * height * width + position) * out_channels + c;
              for (int j = 0; j < 4; ++j) {
                vwf y = transformed[j];
                if (ap) y += loadw(ap + (position + j) * out_channels + c);
                storew(target + j * out_channels, y);
                tile_sum += y;
                tile_squares += y * y;
              }
            }
            if (mp) {
              double* sums = own_moments.data() + n * 2 * out_channels + c;
              for (int l = 0; l < kLanes; ++l) {
                sums[l] += tile_sum[l];
                sums[out_channels + l] += tile_squares[l];
              }
            }
          }
        }
      }
    }
    if (mp) {
      std::lock_guard<std::mutex> lock(task_moments_mutex);
      task_moments.emplace_back(begin, std::move(own_moments));
    }
  });
  if (mp) {
    std::sort(task_moments.begin(), task_moments.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
    std::fill(mp, mp + n_rows * 2 * out_channels, 0.0);
    for (const auto& task : task_moments) {
      for (int64_t i = 0; i < n_rows * 2 * out_channels; ++i) mp[i] += task.second[i];
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(sed_cpu, m) {
  m.def("linear_attention_sums_(Tensor k, Tensor v, Tensor(a!) kv, Tensor(b!) k_sum) -> ()");
  m.def("linear_attention(Tensor q, Tensor kv, Tensor k_sum, Tensor residual, float eps) -> Tensor");
  m.def("group_norm_relu(Tensor x, Tensor? add, int groups, Tensor weight, Tensor bias, float eps, Tensor(a!) out, Tensor? moments) -> ()");
  m.def(
      "pointwise_mlp(Tensor x, Tensor? norm_weight, Tensor? norm_bias, float norm_eps, Tensor w1t, Tensor b1, Tensor w2t, Tensor b2, "
      "str activation, Tensor? residual, Tensor? scale, Tensor(a!) out) -> ()");
  m.def("single_channel_conv3x3(Tensor x, Tensor weight, Tensor bias) -> Tensor");
  m.def("winograd_conv3x3(Tensor x, Tensor? x2, Tensor u, Tensor? add, Tensor(a!)? moments) -> Tensor");
  m.def("transposed_conv2x2_into(Tensor x, Tensor weight, Tensor bias, bool relu, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(sed_cpu, CPU, m) {
  m.impl("linear_attention_sums_", &linear_attention_sums_);
  m.impl("linear_attention", &linear_attention);
  m.impl("group_norm_relu", &group_norm_relu);
  m.impl("pointwise_mlp", &pointwise_mlp);
  m.impl("single_channel_conv3x3", &single_channel_conv3x3);
  m.impl("transposed_conv2x2_into", &transposed_conv2x2_into);
  m.impl("winograd_conv3x3", &winograd_conv3x3);
}
