// Fused CPU kernels for SED's decoder in float32 inference (see sed_model/cpu_kernels.py).
//
// Each kernel does in one or two passes over memory what PyTorch does in five to eight: the
// decoder's class attention and GroupNorm + ReLU run on tensors of 10-40 MB per chunk whose
// elementwise passes are bound by memory bandwidth. The arithmetic is the layers' own, in another
// order (float32 throughout; GroupNorm's moments in double).
//
// Vectors are GCC/Clang vector extensions, so the same source compiles for any x86-64 level (and
// other architectures); the build picks the host's instruction set.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

typedef float v8f __attribute__((vector_size(32)));
typedef int v8i __attribute__((vector_size(32)));

inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }

inline v8f splat(float x) { return v8f{x, x, x, x, x, x, x, x}; }

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

// kv[l] += sum_n phi(k[n, l]) v[n, l]^T, k_sum[l] += sum_n phi(k[n, l]); VD vectors of 8 per head.
template <int VD>
void class_sums_vec(const float* k, const float* v, float* kv, float* k_sum, int64_t n_rows, int64_t heads_total) {
  constexpr int D = VD * 8;
  at::parallel_for(0, heads_total, kHeadBlock, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; block += kHeadBlock) {
      const int64_t block_end = std::min(block + kHeadBlock, end);
      for (int64_t n = 0; n < n_rows; ++n) {
        for (int64_t l = block; l < block_end; ++l) {
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
        }
      }
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
  at::parallel_for(0, heads_total, kHeadBlock, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; block += kHeadBlock) {
      const int64_t block_end = std::min(block + kHeadBlock, end);
      for (int64_t n = 0; n < n_rows; ++n) {
        for (int64_t l = block; l < block_end; ++l) {
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
        }
      }
    }
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
// (positions, C) and the same for every row, or undefined. `out` may be `x`.
void group_norm_relu(const at::Tensor& x, const std::optional<at::Tensor>& add, int64_t groups, const at::Tensor& weight,
                     const at::Tensor& bias, double eps, at::Tensor& out) {
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
  // Per row and channel: the affine map that GroupNorm + its weight and bias amount to.
  std::vector<float> scale(n_rows * channels), shift(n_rows * channels);
  at::parallel_for(0, n_rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> sum(channels), squares(channels);
    for (int64_t n = begin; n < end; ++n) {
      std::fill(sum.begin(), sum.end(), 0.0);
      std::fill(squares.begin(), squares.end(), 0.0);
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

}  // namespace

TORCH_LIBRARY(sed_cpu, m) {
  m.def("linear_attention_sums_(Tensor k, Tensor v, Tensor(a!) kv, Tensor(b!) k_sum) -> ()");
  m.def("linear_attention(Tensor q, Tensor kv, Tensor k_sum, Tensor residual, float eps) -> Tensor");
  m.def("group_norm_relu(Tensor x, Tensor? add, int groups, Tensor weight, Tensor bias, float eps, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(sed_cpu, CPU, m) {
  m.impl("linear_attention_sums_", &linear_attention_sums_);
  m.impl("linear_attention", &linear_attention);
  m.impl("group_norm_relu", &group_norm_relu);
}
