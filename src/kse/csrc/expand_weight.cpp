// kse::expand_weight and kse::expand_weight_backward: the training weight of a KSE layer on the CPU
// (KSE, Li et al., CVPR 2019, Sec. 3.4). W'[n, j] = cents[rows[n, j]] (a kh x kw kernel), zero
// where rows[n, j] < 0, laid out NCHW or channels_last; backward: grad cents[r] = sum of the
// gradients of the kernels that use r (centroids are trained, assignments frozen). One call per
// layer, in place of the stock pad / index_select / view / permute and their backward nodes; the
// autograd formula that joins the two operators is in kse/ops.py.
#include "kse.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

// work items per thread chunk for at::parallel_for: about 32768 elements each (at least LOW items)
static int64_t grain(int64_t low, int64_t elements_per_item) {
  return std::max<int64_t>(low, 32768 / std::max<int64_t>(1, elements_per_item));
}

template <typename T>
static void expand_rows(const T* c, const int32_t* rows, T* out, int64_t N, int64_t J, int64_t D, bool cl) {
  at::parallel_for(0, N, grain(1, J * D), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      T* o = out + n * J * D;
      const int32_t* rn = rows + n * J;
      if (cl) {  // [kh * kw, J] per output channel: written in order
        for (int64_t t = 0; t < D; ++t)
          for (int64_t j = 0; j < J; ++j) o[t * J + j] = rn[j] >= 0 ? c[rn[j] * D + t] : T(0);
        continue;
      }
      for (int64_t j = 0; j < J; ++j) {
        const int32_t r = rn[j];
        if (r >= 0) {
          std::memcpy(o + j * D, c + r * D, D * sizeof(T));
        } else {
          std::fill(o + j * D, o + (j + 1) * D, T(0));
        }
      }
    }
  });
}

// DISJOINT: no centroid row is used by two columns j (KSE: each channel has its own centroids),
// so columns can be reduced in parallel without two threads adding into one row
#if defined(__AVX512F__)
static void reduce_columns_cl_f32(const float*, const int32_t*, float*, int64_t, int64_t, int64_t, int64_t, int64_t);
#endif

template <typename T>
static void reduce_rows(const T* g, const int32_t* rows, T* gc, int64_t N, int64_t J, int64_t D, bool cl,
                        bool disjoint) {
  auto columns = [&](int64_t j0, int64_t j1) {
#if defined(__AVX512F__)
    if constexpr (std::is_same<T, float>::value)
      if (cl && D >= 4 && D <= 16) return reduce_columns_cl_f32(g, rows, gc, N, J, D, j0, j1);
#endif
    for (int64_t n = 0; n < N; ++n) {
      const T* gn = g + n * J * D;
      const int32_t* rn = rows + n * J;
      if (cl) {
        for (int64_t t = 0; t < D; ++t)
          for (int64_t j = j0; j < j1; ++j)
            if (rn[j] >= 0) gc[rn[j] * D + t] += gn[t * J + j];
      } else {
        for (int64_t j = j0; j < j1; ++j)
          if (rn[j] >= 0)
            for (int64_t t = 0; t < D; ++t) gc[rn[j] * D + t] += gn[j * D + t];
      }
    }
  };
  if (disjoint) at::parallel_for(0, J, grain(16, N * D), columns);
  else columns(0, J);
}

#if defined(__AVX512F__)
// float32 with AVX-512, the same values as expand_rows and reduce_rows: channels_last with 4 to
// 16 taps (3x3 kernels), 16 kernels at a time transposed in registers between their [kernel, tap]
// and the weight's [tap, kernel] order, forward and backward (rather than a gather per tap and a
// scalar backward loop: benchmarks/train_weight.py times them); other channels_last
// kernels, a gather per tap (the backward a loop); NCHW, a masked load and store of each
// kernel's D taps
static inline __mmask16 first_lanes(int64_t w) { return (__mmask16)((1u << w) - 1u); }

// a 16 x 16 transpose in registers: r[i] holds row i on entry and column i on return
static inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  // r[4g + c]: in 128-bit lane L, element 4L + c of rows 4g .. 4g + 3
  for (int g = 0; g < 4; ++g) {
    r[4 * g + 0] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
    r[4 * g + 1] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0xEE);
    r[4 * g + 2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
    r[4 * g + 3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
  }
  // then 128-bit lanes: lanes 0 and 2 / 1 and 3 of two registers, twice
  for (int c = 0; c < 4; ++c) {
    t[c] = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88);
    t[4 + c] = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xdd);
    t[8 + c] = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88);
    t[12 + c] = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xdd);
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm512_shuffle_f32x4(t[c], t[8 + c], 0x88);
    r[8 + c] = _mm512_shuffle_f32x4(t[c], t[8 + c], 0xdd);
    r[4 + c] = _mm512_shuffle_f32x4(t[4 + c], t[12 + c], 0x88);
    r[12 + c] = _mm512_shuffle_f32x4(t[4 + c], t[12 + c], 0xdd);
  }
}

// channels_last backward for 4 <= D <= 16, columns [j0, j1): per output channel n and 16
// columns, the D rows g[n, t, j] are transposed into 16 kernel gradients, each added to its
// centroid row with one masked load / add / store (columns one after another, so two columns
// sharing a row are summed right). The sums run over n in the same order as the scalar loop
static void reduce_columns_cl_f32(const float* g, const int32_t* rows, float* gc, int64_t N, int64_t J, int64_t D,
                                  int64_t j0, int64_t j1) {
  const __mmask16 taps = first_lanes(D);
  for (int64_t n = 0; n < N; ++n) {
    const float* gn = g + n * J * D;
    const int32_t* rn = rows + n * J;
    for (int64_t jb = j0; jb < j1; jb += 16) {
      const int64_t w = std::min<int64_t>(16, j1 - jb);
      const __mmask16 lanes = first_lanes(w);
      __m512 r[16];
      for (int64_t t = 0; t < 16; ++t)
        r[t] = t < D ? _mm512_maskz_loadu_ps(lanes, gn + t * J + jb) : _mm512_setzero_ps();
      transpose16(r);
      for (int64_t j = 0; j < w; ++j) {
        const int32_t row = rn[jb + j];
        if (row < 0) continue;
        float* dst = gc + (int64_t)row * D;
        _mm512_mask_storeu_ps(dst, taps, _mm512_add_ps(_mm512_maskz_loadu_ps(taps, dst), r[j]));
      }
    }
  }
}

static void expand_rows_f32(const float* c, const int32_t* rows, float* out, int64_t N, int64_t J, int64_t D,
                            bool cl) {
  at::parallel_for(0, N, grain(1, J * D), [&](int64_t n0, int64_t n1) {
    const __m512 zero = _mm512_setzero_ps();
    const __mmask16 taps = first_lanes(std::min<int64_t>(D, 16));
    for (int64_t n = n0; n < n1; ++n) {
      float* o = out + n * J * D;
      const int32_t* rn = rows + n * J;
      if (cl && D >= 4 && D <= 16) {  // 16 kernels loaded whole, transposed into D rows of 16
        for (int64_t j0 = 0; j0 < J; j0 += 16) {
          const int64_t w = std::min<int64_t>(16, J - j0);
          __m512 r[16];
          for (int64_t j = 0; j < 16; ++j) {
            const int32_t row = j < w ? rn[j0 + j] : -1;
            r[j] = row >= 0 ? _mm512_maskz_loadu_ps(taps, c + (int64_t)row * D) : zero;
          }
          transpose16(r);
          for (int64_t t = 0; t < D; ++t) _mm512_mask_storeu_ps(o + t * J + j0, first_lanes(w), r[t]);
        }
        continue;
      }
      if (cl) {  // other kernel sizes: a gather per tap for 16 kernels
        for (int64_t j0 = 0; j0 < J; j0 += 16) {
          const __mmask16 lanes = first_lanes(std::min<int64_t>(16, J - j0));
          const __m512i r = _mm512_maskz_loadu_epi32(lanes, rn + j0);
          const __mmask16 keep = _mm512_mask_cmpge_epi32_mask(lanes, r, _mm512_setzero_si512());
          __m512i idx = _mm512_mullo_epi32(r, _mm512_set1_epi32((int32_t)D));
          for (int64_t t = 0; t < D; ++t, idx = _mm512_add_epi32(idx, _mm512_set1_epi32(1)))
            _mm512_mask_storeu_ps(o + t * J + j0, lanes, _mm512_mask_i32gather_ps(zero, keep, idx, c, 4));
        }
        continue;
      }
      for (int64_t j = 0; j < J; ++j) {
        const int32_t r = rn[j];
        for (int64_t t0 = 0; t0 < D; t0 += 16) {
          const __mmask16 m = first_lanes(std::min<int64_t>(16, D - t0));
          _mm512_mask_storeu_ps(o + j * D + t0, m, r >= 0 ? _mm512_maskz_loadu_ps(m, c + r * D + t0) : zero);
        }
      }
    }
  });
}

#endif

// the float32 vector path where it applies (gather indices must fit in int32)
template <typename T>
static void expand_any(const T* c, const int32_t* rows, T* out, int64_t M, int64_t N, int64_t J, int64_t D, bool cl) {
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value)
    if (M * D < (int64_t(1) << 31)) return expand_rows_f32(c, rows, out, N, J, D, cl);
#endif
  expand_rows<T>(c, rows, out, N, J, D, cl);
}

static std::vector<int64_t> weight_strides(int64_t J, int64_t kh, int64_t kw, bool cl) {
  if (cl) return {kh * kw * J, 1, kw * J, J};
  return {J * kh * kw, kh * kw, kw, 1};
}

// rows [N, J] int32, each in [-1, M): checked before a kernel trusts them (the operators are public)
static void check_rows(const char* op, const at::Tensor& rows, int64_t M) {
  TORCH_CHECK(rows.dim() == 2 && rows.scalar_type() == at::kInt && rows.is_contiguous() && rows.device().is_cpu(),
              op, ": rows must be a contiguous int32 [N, J] CPU tensor");
  const int32_t* r = rows.data_ptr<int32_t>();
  bool ok = true;
  for (int64_t i = 0; i < rows.numel(); ++i) ok &= r[i] >= -1 && r[i] < M;
  TORCH_CHECK(ok, op, ": a row index is out of range");
}

namespace kse {

// cents [M, kh, kw]; rows [N, J] int32 (centroid row of each kernel, -1 for a zero kernel);
// disjoint: the caller knows that no row appears in two columns (the backward is then parallel)
at::Tensor expand_weight(const at::Tensor& cents, const at::Tensor& rows, bool channels_last, bool disjoint) {
  TORCH_CHECK(cents.dim() == 3 && cents.device().is_cpu(), "expand_weight: cents must be [M, kh, kw] on the CPU");
  check_rows("expand_weight", rows, cents.size(0));
  at::Tensor c = cents.contiguous();
  const int64_t N = rows.size(0), J = rows.size(1), kh = c.size(1), kw = c.size(2);
  at::Tensor out = at::empty_strided({N, J, kh, kw}, weight_strides(J, kh, kw, channels_last), c.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "kse_expand_weight", [&] {
    expand_any<scalar_t>(c.data_ptr<scalar_t>(), rows.data_ptr<int32_t>(), out.data_ptr<scalar_t>(), c.size(0), N,
                         J, kh * kw, channels_last);
  });
  return out;
}

// grad [N, J, kh, kw] (any layout) -> grad cents [M, kh, kw]. float16 / bfloat16 gradients are
// summed in float32 (a centroid may collect hundreds of kernel gradients), then rounded once
at::Tensor expand_weight_backward(const at::Tensor& grad, const at::Tensor& rows, int64_t num_centroids,
                                  bool channels_last, bool disjoint) {
  TORCH_CHECK(num_centroids >= 0, "expand_weight_backward: num_centroids must be >= 0");
  check_rows("expand_weight_backward", rows, num_centroids);
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == rows.size(0) && grad.size(1) == rows.size(1) && grad.device().is_cpu(),
              "expand_weight_backward: grad must be a [N, J, kh, kw] CPU tensor, with rows [N, J]");
  const int64_t M = num_centroids, N = rows.size(0), J = rows.size(1), kh = grad.size(2), kw = grad.size(3);
  const auto strides = weight_strides(J, kh, kw, channels_last);
  const auto type = grad.scalar_type();
  const auto sum_type = type == at::kHalf || type == at::kBFloat16 ? at::kFloat : type;
  at::Tensor g = grad;
  if (g.strides() != at::IntArrayRef(strides) || sum_type != type)
    g = at::empty_strided(g.sizes(), strides, g.options().dtype(sum_type)).copy_(g);
  at::Tensor gc = at::zeros({M, kh, kw}, g.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "kse_expand_weight_backward", [&] {
    reduce_rows<scalar_t>(g.data_ptr<scalar_t>(), rows.data_ptr<int32_t>(), gc.data_ptr<scalar_t>(), N, J, kh * kw,
                          channels_last, disjoint);
  });
  return gc.to(type);
}

}  // namespace kse

TORCH_LIBRARY_IMPL(kse, CPU, m) {
  m.impl("expand_weight", TORCH_FN(kse::expand_weight));
  m.impl("expand_weight_backward", TORCH_FN(kse::expand_weight_backward));
}
