"""Fused centroid convolution + channel fusion for KSE layers on the CPU (KSE.md §7).

The paper's split form, in one pass over each tile of 32 output pixels:

    r[c, j]  = sum_{i, k} x[c, p + tap(i, k)] * B_c[j][i, k]     (2D part: q_c centroids of channel c)
    y[n]     = s[n] * sum_{c kept} r[c, idx_c[n]] + b[n]         (fusion: one add per kept channel)

so it costs ``sum_c q_c * kh * kw`` multiply-adds plus ``N * C_kept`` adds per pixel, against
``N * C * kh * kw`` for the dense convolution. The kept channels are taken in chunks whose
centroid responses (at least 128 rows of 32 floats, 2N for wide layers: :func:`chunk_rows`)
stay in cache while the fusion reads them by index, four outputs at a time; the outputs of a
tile stay in a buffer of ``N x 32`` floats until the last chunk, then its valid pixels are
copied to the result.

Stride 1, no dilation, float32 (other layers keep the stock forms). The pixels of a tile are
consecutive, so a 3x3 tap is a fixed offset and every load is a contiguous vector. For
same-size convolutions (padding (k - 1) / 2, most CNN layers) the input planes of all images are
laid end to end without padding and the taps that fall outside their image are masked: every
computed output is kept, and a tile may span images (on a 7x7 map, 49 outputs per image
instead of 64); they also read a channels_last input as it is and answer channels_last. Other
layers use a zero-padded plane per image whose rows share their padding column, which is
computed and dropped (channels_last inputs are converted to NCHW first). Tiles are spread
over torch's threads (OpenMP). The extension is compiled on first use with
``torch.utils.cpp_extension.load_inline`` (a C++ compiler and ninja are needed; about
15 s once, then cached); ``available()`` says whether it built. Loading it registers the
operator ``torch.ops.kse.fused_conv``, which ``torch.jit.trace`` records (a saved TorchScript
model needs the library loaded to run); eager calls go through a direct Python binding, about
3 us cheaper per call. Every index the kernel reads is checked first (about 1 us per call).

The same extension builds W' for training steps on the CPU (:func:`expand_weight`): one call and
one C++ autograd node per layer instead of five stock operations and their backward nodes.
"""

from __future__ import annotations

import os
import threading
from typing import Optional

import torch
from torch import Tensor

_SOURCE = r"""
#include <torch/csrc/utils/pybind.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/csrc/autograd/custom_function.h>
#include <vector>
#include <cstring>
#include <algorithm>
#include <array>
#include <map>
#include <memory>
#include <mutex>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
static const int L = 16;   // floats per vector
static const int V = 2;    // vectors per tile: each centroid weight is used for 2 x 16 pixels
static const int TL = L * V;

static inline v16 load(const float* p) { return *reinterpret_cast<const v16u*>(p); }
static inline void store(float* p, v16 v) { *reinterpret_cast<v16u*>(p) = v; }

// centroid responses of one tile: R[r] (TL floats) for every centroid row r of every kept channel.
// MASK (the compact layout): lane l of tap i is kept where mk[i * ms + l] is all ones, zeroed
// where the tap falls outside the lane's image
typedef int32_t v16i __attribute__((vector_size(64)));
typedef int32_t v16iu __attribute__((vector_size(64), aligned(4)));
static inline v16 tap(const float* p, const int32_t* m, bool mask) {
  if (!mask) return load(p);
  return (v16)((v16i)load(p) & *reinterpret_cast<const v16iu*>(m));
}

template <int KK, bool MASK>
static void tile_centroids(const float* xp, int64_t plane, int64_t t0, const int64_t* taps, int K,
                           const int32_t* offsets, const float* cents, int kk, const int32_t* mk, int64_t ms,
                           float* R) {
  for (int c = 0; c < K; ++c) {
    const float* xc = xp + c * plane + t0;
    const int32_t r0 = offsets[c], r1 = offsets[c + 1];
    if (KK > 0) {
      v16 X[KK][V];
      for (int i = 0; i < KK; ++i)
        for (int v = 0; v < V; ++v) X[i][v] = tap(xc + taps[i] + v * L, mk + i * ms + v * L, MASK);
      for (int r = r0; r < r1; ++r) {
        const float* w = cents + (int64_t)r * KK;
        v16 acc[V];
        for (int v = 0; v < V; ++v) acc[v] = X[0][v] * w[0];
        for (int i = 1; i < KK; ++i) { const float wi = w[i]; for (int v = 0; v < V; ++v) acc[v] += X[i][v] * wi; }
        for (int v = 0; v < V; ++v) store(R + (int64_t)r * TL + v * L, acc[v]);
      }
    } else {
      for (int r = r0; r < r1; ++r) {
        const float* w = cents + (int64_t)r * kk;
        for (int v = 0; v < V; ++v) {
          v16 acc = tap(xc + taps[0] + v * L, mk + v * L, MASK) * w[0];
          for (int i = 1; i < kk; ++i) acc += tap(xc + taps[i] + v * L, mk + i * ms + v * L, MASK) * w[i];
          store(R + (int64_t)r * TL + v * L, acc);
        }
      }
    }
  }
}

// channel fusion of one chunk of kept channels into the tile's outputs: NB outputs at a time,
// so that 2 * NB independent accumulators hide the latency of the adds
template <int NB>
static inline void fuse_block(float* g, int64_t Tp, const int32_t* const* an, int c0, int c1, const float* R,
                              bool first) {
  v16 acc[NB][V];
  for (int j = 0; j < NB; ++j)
    for (int v = 0; v < V; ++v)
      acc[j][v] = first ? (v16){} : load(g + j * Tp + v * L);
  for (int c = c0; c < c1; ++c)
    for (int j = 0; j < NB; ++j) {
      const float* r = R + (int64_t)an[j][c] * TL;
      for (int v = 0; v < V; ++v) acc[j][v] += load(r + v * L);
    }
  for (int j = 0; j < NB; ++j)
    for (int v = 0; v < V; ++v) store(g + j * Tp + v * L, acc[j][v]);
}

// one run of valid pixels of a tile, for every output n: dst[n] = src[n] (mode 0), or
// max(s * src + b, 0) (1), or s * src + b (2). Kept out of line: inlined, its loops made the
// compiler lay out the tile loop differently and the kernel 3% slower at batch 64
static void __attribute__((noinline)) write_run(float* dst, int64_t dst_stride, const float* src, int64_t src_stride,
                                                int N, int64_t len, const float* ss, const float* bs, int mode) {
  for (int n = 0; n < N; ++n) {
    const float* a = src + (int64_t)n * src_stride;
    float* d = dst + (int64_t)n * dst_stride;
    const float sn = ss[n], bn = bs[n];
    if (mode == 0) std::memcpy(d, a, len * sizeof(float));
    else if (mode == 1) for (int64_t i = 0; i < len; ++i) d[i] = std::max(a[i] * sn + bn, 0.f);
    else for (int64_t i = 0; i < len; ++i) d[i] = a[i] * sn + bn;
  }
}

// the same for a channels_last output: pixel i's N outputs are contiguous, at dst + i * N
static void __attribute__((noinline)) write_pixels(float* dst, const float* src, int64_t src_stride, int N,
                                                   int64_t len, const float* ss, const float* bs, int mode) {
  for (int64_t i = 0; i < len; ++i) {
    float* d = dst + i * N;
    const float* a = src + i;
    if (mode == 0) for (int n = 0; n < N; ++n) d[n] = a[n * src_stride];
    else if (mode == 1) for (int n = 0; n < N; ++n) d[n] = std::max(a[n * src_stride] * ss[n] + bs[n], 0.f);
    else for (int n = 0; n < N; ++n) d[n] = a[n * src_stride] * ss[n] + bs[n];
  }
}

// the operator is public (torch.ops.kse.fused_conv): every index is checked before the kernel
// trusts it, so that wrong tensors give an error instead of reads out of bounds
static void check_inputs(const at::Tensor& x, const at::Tensor& kept, const at::Tensor& cents,
                         const at::Tensor& offsets, const at::Tensor& assign, const at::Tensor& scale,
                         const at::Tensor& bias, const at::Tensor& chunks, int64_t kh, int64_t kw, int64_t ph,
                         int64_t pw) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "fused_conv: x must be a float32 CPU tensor [B, C, H, W]");
  TORCH_CHECK(kh >= 1 && kw >= 1 && ph >= 0 && pw >= 0, "fused_conv: kernel sizes >= 1 and paddings >= 0 needed");
  auto is = [](const at::Tensor& t, at::ScalarType type, int64_t dim) {
    return t.scalar_type() == type && t.dim() == dim && t.is_contiguous() && t.device().is_cpu();
  };
  TORCH_CHECK(is(kept, at::kLong, 1) && kept.size(0) >= 1, "fused_conv: kept must be int64 [K], K >= 1");
  const int64_t K = kept.size(0), C = x.size(1);
  TORCH_CHECK(is(cents, at::kFloat, 2) && cents.size(1) == kh * kw, "fused_conv: cents must be float32 [M, kh * kw]");
  TORCH_CHECK(is(offsets, at::kInt, 1) && offsets.size(0) == K + 1, "fused_conv: offsets must be int32 [K + 1]");
  TORCH_CHECK(is(assign, at::kInt, 2) && assign.size(1) == K, "fused_conv: assign must be int32 [N, K]");
  const int64_t N = assign.size(0);
  TORCH_CHECK(is(scale, at::kFloat, 1) && scale.size(0) == N && is(bias, at::kFloat, 1) && bias.size(0) == N,
              "fused_conv: scale and bias must be float32 [N]");
  TORCH_CHECK(is(chunks, at::kInt, 1) && chunks.size(0) >= 2, "fused_conv: chunks must be int32 [n + 1]");
  // branch-free scans (one check after each loop): at batch 1 a layer takes tens of microseconds
  const int64_t* kp = kept.data_ptr<int64_t>();
  bool ok = true;
  for (int64_t c = 0; c < K; ++c) ok &= (kp[c] >= 0) & (kp[c] < C);
  TORCH_CHECK(ok, "fused_conv: kept channel out of range");
  const int32_t* os = offsets.data_ptr<int32_t>();
  TORCH_CHECK(os[0] == 0 && os[K] == cents.size(0), "fused_conv: offsets must run from 0 to M");
  for (int64_t c = 0; c < K; ++c) ok &= os[c] < os[c + 1];
  TORCH_CHECK(ok, "fused_conv: every kept channel needs a centroid");
  const int32_t* as = assign.data_ptr<int32_t>();
  for (int64_t n = 0; n < N; ++n) {
    const int32_t* an = as + n * K;
    for (int64_t c = 0; c < K; ++c) ok &= (an[c] >= os[c]) & (an[c] < os[c + 1]);
  }
  TORCH_CHECK(ok, "fused_conv: assign[n, c] must be one of channel c's centroid rows");
  const int32_t* ch = chunks.data_ptr<int32_t>();
  const int64_t nch = chunks.size(0) - 1;
  TORCH_CHECK(ch[0] == 0 && ch[nch] == K, "fused_conv: chunks must run from 0 to K");
  for (int64_t k = 0; k < nch; ++k) ok &= ch[k] < ch[k + 1];
  TORCH_CHECK(ok, "fused_conv: chunks must increase");
}

// the compact layout's tap masks for one map and kernel shape: for tap i and position r of an
// image (r < HW + TL, wrapping into the next image), all ones where the tap reads inside the
// image, else zero; built once per shape (a few microseconds on a 28x28 map: at batch 1 a layer
// takes about 30) and kept, at most 64 MiB of them (2 MiB for a 3x3 kernel on a 224x224 map)
static std::shared_ptr<const std::vector<int32_t>> tap_masks(int64_t H, int64_t W, int64_t kh, int64_t kw,
                                                             int64_t ph, int64_t pw) {
  static std::mutex lock;
  static std::map<std::array<int64_t, 6>, std::shared_ptr<const std::vector<int32_t>>> cache;
  const std::array<int64_t, 6> key{H, W, kh, kw, ph, pw};
  {
    std::lock_guard<std::mutex> guard(lock);
    auto found = cache.find(key);
    if (found != cache.end()) return found->second;
  }
  const int64_t HW = H * W, ms = HW + TL;
  auto table = std::make_shared<std::vector<int32_t>>(kh * kw * ms);
  for (int64_t r = 0; r < ms; ++r) {
    const int64_t h = (r % HW) / W, w = (r % HW) % W;
    for (int64_t i = 0; i < kh; ++i)
      for (int64_t j = 0; j < kw; ++j)
        (*table)[(i * kw + j) * ms + r] = (h + i - ph >= 0 && h + i - ph < H && w + j - pw >= 0 && w + j - pw < W) ? -1 : 0;
  }
  static int64_t bytes = 0;
  std::lock_guard<std::mutex> guard(lock);
  const int64_t size = (int64_t)table->size() * sizeof(int32_t);
  if (bytes + size > (int64_t{64} << 20)) {
    cache.clear();
    bytes = 0;
  }
  if (cache.emplace(key, table).second) bytes += size;
  return table;
}

at::Tensor fused_conv(at::Tensor x, at::Tensor kept, at::Tensor cents, at::Tensor offsets,
                      at::Tensor assign, at::Tensor scale, at::Tensor bias, at::Tensor chunks,
                      int64_t kh, int64_t kw, int64_t ph, int64_t pw, bool relu) {
  check_inputs(x, kept, cents, offsets, assign, scale, bias, chunks, kh, kw, ph, pw);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  const int K = kept.size(0), N = assign.size(0), kk = kh * kw, nchunks = chunks.size(0) - 1;
  const int64_t Hp = H + 2 * ph, Ho = Hp - kh + 1, Wo = W + 2 * pw - kw + 1;
  TORCH_CHECK(Ho > 0 && Wo > 0, "input smaller than the kernel");
  const bool compact = Ho == H && Wo == W;  // the layout of same-size convolutions, below
  // channels_last in, channels_last out (compact layout: the model keeps its layout); anything
  // else is read as contiguous NCHW and written NCHW
  const bool nhwc = compact && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  if (!nhwc) x = x.contiguous();
  // Two layouts of the input. Compact, for same-size convolutions (Ho == H, Wo == W): the
  // planes of all images one after the other, unpadded; the taps that fall outside their image
  // are masked, every computed output is kept and a tile may span images. Padded, for the
  // others: each image's plane zero-padded, with a row stride Wp where a row's right padding
  // doubles as the next row's left padding (both zeros) when that leaves room for every output
  // column (pw <= kw - 1); outputs are computed on the Ho x Wp grid and the padding columns
  // dropped. On a 7x7 map with a 3x3 kernel the padded grid computes 64 outputs per image (2
  // tiles), the compact one 49; compact was faster on every ResNet-56 layer at batch 1 and 64.
  const int64_t Wp = pw <= kw - 1 ? W + pw : W + 2 * pw;
  const int64_t T = Ho * Wp, ntiles_img = (T + TL - 1) / TL;
  const bool masked = compact && kk > 1;
  const int64_t lead = compact ? ph * W + pw : 0;             // zeros before the first image
  const int64_t ntiles = compact ? (B * HW + TL - 1) / TL : B * ntiles_img;
  const int64_t plane = compact ? lead + ntiles * TL + (kh - 1 - ph) * W + (kw - 1 - pw) + TL   // one kept channel
                                : ntiles_img * TL + (kh - 1) * Wp + kw + TL;                  // one image's channel
  auto xp = at::empty({compact ? 1 : B, (int64_t)K, plane}, x.options());
  auto out = at::empty({B, (int64_t)N, Ho, Wo},
                       x.options().memory_format(nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
  const float* xs = x.data_ptr<float>();
  float* xps = xp.data_ptr<float>();
  const int64_t* kp = kept.data_ptr<int64_t>();
  if (nhwc) {  // (b, pixel) rows of C channels -> the kept channels' planes
    at::parallel_for(0, B * HW, 256, [&](int64_t begin, int64_t end) {
      for (int64_t p0 = begin; p0 < end; p0 += 64) {  // 64 pixels' channels stay in L1 across the K reads
        const int64_t p1 = std::min(end, p0 + 64);
        for (int64_t c = 0; c < K; ++c) {
          const float* src = xs + kp[c];
          float* dst = xps + c * plane + lead;
          for (int64_t bp = p0; bp < p1; ++bp) dst[bp] = src[bp * C];
        }
      }
    });
  } else at::parallel_for(0, B * K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bc = begin; bc < end; ++bc) {
      const int64_t b = bc / K, c = bc % K;
      const float* src = xs + (b * C + kp[c]) * HW;
      if (compact) {
        std::memcpy(xps + c * plane + lead + b * HW, src, HW * sizeof(float));
        continue;
      }
      float* dst = xps + bc * plane;
      std::memset(dst, 0, (ph * Wp) * sizeof(float));
      for (int64_t h = 0; h < H; ++h) {
        float* row = dst + (h + ph) * Wp;
        for (int64_t j = 0; j < pw; ++j) row[j] = row[pw + W + j] = 0.f;
        std::memcpy(row + pw, src + h * W, W * sizeof(float));
      }
      std::memset(dst + (H + ph) * Wp, 0, (plane - (H + ph) * Wp) * sizeof(float));
    }
  });
  if (compact)  // the zeros around the images of each kept channel (read by masked lanes and the last tile)
    for (int64_t c = 0; c < K; ++c) {
      std::memset(xps + c * plane, 0, lead * sizeof(float));
      std::memset(xps + c * plane + lead + B * HW, 0, (plane - lead - B * HW) * sizeof(float));
    }
  std::vector<int64_t> taps(kk);
  for (int i = 0; i < kh; ++i)
    for (int j = 0; j < kw; ++j) taps[i * kw + j] = compact ? (i - ph) * W + (j - pw) : i * Wp + j;
  const int64_t ms = masked ? HW + TL : 0;
  std::shared_ptr<const std::vector<int32_t>> mask_table;
  if (masked) mask_table = tap_masks(H, W, kh, kw, ph, pw);
  const int32_t* masks = masked ? mask_table->data() : nullptr;
  const float* cs = cents.data_ptr<float>();
  const int32_t* os = offsets.data_ptr<int32_t>();
  const int32_t* as = assign.data_ptr<int32_t>();
  const int32_t* ch = chunks.data_ptr<int32_t>();
  const float* bs = bias.data_ptr<float>();
  const float* ss = scale.data_ptr<float>();
  bool plain = !relu;  // scale 1 and bias 0 everywhere: the outputs are copied as they are
  for (int n = 0; n < N; ++n) plain &= (ss[n] == 1.f) & (bs[n] == 0.f);
  const int mode = plain ? 0 : relu ? 1 : 2;
  float* ys = out.data_ptr<float>();
  int max_rows = 0;
  for (int k = 0; k < nchunks; ++k) max_rows = std::max(max_rows, os[ch[k + 1]] - os[ch[k]]);
  at::parallel_for(0, ntiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> Rbuf((int64_t)max_rows * TL + TL);
    std::vector<float> tile((int64_t)N * TL);  // the tile's outputs, [N][TL]
    for (int64_t bt = begin; bt < end; ++bt) {
      // padded: tile t0 of image b; compact: positions t0.. of all images (b = 0)
      const int64_t b = compact ? 0 : bt / ntiles_img, t0 = (compact ? bt : bt % ntiles_img) * TL;
      const float* xb = xps + b * K * plane + lead;
      const int32_t* mk = masked ? masks + t0 % HW : nullptr;
      float* gb = tile.data();
      for (int k = 0; k < nchunks; ++k) {        // chunks of channels whose responses stay in cache
        const int c0 = ch[k], c1 = ch[k + 1];
        const int32_t r0 = os[c0];
        float* R = Rbuf.data() - (int64_t)r0 * TL;  // indexed by the global row
        // centroid responses of the chunk
        const float* xc = xb + (int64_t)c0 * plane;
        if (masked) {
          if (kk == 9) tile_centroids<9, true>(xc, plane, t0, taps.data(), c1 - c0, os + c0, cs, kk, mk, ms, R);
          else tile_centroids<0, true>(xc, plane, t0, taps.data(), c1 - c0, os + c0, cs, kk, mk, ms, R);
        } else {
          if (kk == 9) tile_centroids<9, false>(xc, plane, t0, taps.data(), c1 - c0, os + c0, cs, kk, mk, ms, R);
          else if (kk == 1) tile_centroids<1, false>(xc, plane, t0, taps.data(), c1 - c0, os + c0, cs, kk, mk, ms, R);
          else tile_centroids<0, false>(xc, plane, t0, taps.data(), c1 - c0, os + c0, cs, kk, mk, ms, R);
        }
        int n = 0;
        for (; n + 4 <= N; n += 4) {
          const int32_t* an[4] = {as + (int64_t)n * K, as + (int64_t)(n + 1) * K, as + (int64_t)(n + 2) * K,
                                  as + (int64_t)(n + 3) * K};
          fuse_block<4>(gb + n * TL, TL, an, c0, c1, R, k == 0);
        }
        for (; n < N; ++n) {
          const int32_t* an[1] = {as + (int64_t)n * K};
          fuse_block<1>(gb + n * TL, TL, an, c0, c1, R, k == 0);
        }
      }
      // the tile's valid outputs -> out[b, :, h, w] = scale * sum + bias (then ReLU), in runs
      if (compact) {
        for (int64_t p = t0; p < std::min(t0 + TL, B * HW);) {  // runs within one image
          const int64_t img = p / HW, r = p % HW, len = std::min(HW - r, t0 + TL - p);
          if (nhwc) write_pixels(ys + (img * HW + r) * N, gb + (p - t0), TL, N, len, ss, bs, mode);
          else write_run(ys + img * N * HW + r, HW, gb + (p - t0), TL, N, len, ss, bs, mode);
          p += len;
        }
        continue;
      }
      for (int64_t p = t0; p < std::min(t0 + TL, T);) {  // runs of columns < Wo of the rows it covers
        const int64_t h = p / Wp, w = p % Wp, run = std::min(Wp - w, t0 + TL - p);
        if (w < Wo) {
          const int64_t len = std::min(run, Wo - w);
          float* dst = ys + (b * N * Ho + h) * Wo + w;
          write_run(dst, Ho * Wo, gb + (p - t0), TL, N, len, ss, bs, mode);
        }
        p += run;
      }
    }
  });
  return out;
}

// an operator (torch.ops.kse.fused_conv), so that torch.jit.trace records it and a saved
// TorchScript model runs it once this library is loaded
TORCH_LIBRARY(kse, m) {
  m.def("fused_conv(Tensor x, Tensor kept, Tensor cents, Tensor offsets, Tensor assign, Tensor scale, "
        "Tensor bias, Tensor chunks, int kh, int kw, int ph, int pw, bool relu) -> Tensor");
  m.impl("fused_conv", c10::DispatchKey::CPU, TORCH_FN(fused_conv));
}

// ---------------------------------------------------------------- training weight W'
// W'[n, j] = cents[rows[n, j]] (a kh x kw kernel), zero where rows[n, j] < 0, laid out NCHW or
// channels_last; backward: grad cents[r] = sum of the gradients of the kernels that use r.
// One call and one autograd node per layer, in place of the stock pad / index_select / view /
// permute and their backward nodes.
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
// and the weight's [tap, kernel] order, forward and backward (gathers, one per tap, and a scalar
// backward loop were about twice as slow: benchmarks/train_weight.py); other channels_last
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

struct ExpandWeight : public torch::autograd::Function<ExpandWeight> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& cents, const at::Tensor& rows,
                            bool cl, bool disjoint) {
    at::Tensor c = cents.contiguous();
    const int64_t N = rows.size(0), J = rows.size(1), kh = c.size(1), kw = c.size(2);
    at::Tensor out = at::empty_strided({N, J, kh, kw}, weight_strides(J, kh, kw, cl), c.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "kse_expand_weight", [&] {
      expand_any<scalar_t>(c.data_ptr<scalar_t>(), rows.data_ptr<int32_t>(), out.data_ptr<scalar_t>(), c.size(0),
                           N, J, kh * kw, cl);
    });
    ctx->save_for_backward({rows});
    ctx->saved_data["cl"] = cl;
    ctx->saved_data["disjoint"] = disjoint;
    ctx->saved_data["M"] = c.size(0);
    ctx->saved_data["kh"] = kh;
    ctx->saved_data["kw"] = kw;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const at::Tensor rows = ctx->get_saved_variables()[0];
    const bool cl = ctx->saved_data["cl"].toBool(), disjoint = ctx->saved_data["disjoint"].toBool();
    const int64_t M = ctx->saved_data["M"].toInt(), kh = ctx->saved_data["kh"].toInt();
    const int64_t kw = ctx->saved_data["kw"].toInt(), N = rows.size(0), J = rows.size(1);
    const auto strides = weight_strides(J, kh, kw, cl);
    at::Tensor g = grads[0];
    if (g.requires_grad() || !g.has_storage()) {
      // create_graph (a gradient of this gradient), or a gradient without storage (batched, as
      // with is_grads_batched): the same sums with ATen operations, which autograd records and
      // vmap batches; W'[n, j, t] = cents[rows[n, j], t], dropped kernels summed into a row M
      const int64_t D = kh * kw;
      const at::Tensor r = rows.to(at::kLong);
      const at::Tensor idx = (at::where(r >= 0, r, M).unsqueeze(2) * D + at::arange(D, r.options())).reshape({-1});
      const at::Tensor gc = at::zeros({(M + 1) * D}, g.options()).index_add(0, idx, g.reshape({-1}));
      return {gc.narrow(0, 0, M * D).view({M, kh, kw}), at::Tensor(), at::Tensor(), at::Tensor()};
    }
    // float16 / bfloat16 gradients are summed in float32 (a centroid may collect hundreds of
    // kernel gradients), then rounded once
    const auto type = g.scalar_type();
    const auto sum_type = type == at::kHalf || type == at::kBFloat16 ? at::kFloat : type;
    if (g.strides() != at::IntArrayRef(strides) || sum_type != type)
      g = at::empty_strided(g.sizes(), strides, g.options().dtype(sum_type)).copy_(g);
    at::Tensor gc = at::zeros({M, kh, kw}, g.options());
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "kse_expand_weight_backward", [&] {
      reduce_rows<scalar_t>(g.data_ptr<scalar_t>(), rows.data_ptr<int32_t>(), gc.data_ptr<scalar_t>(), N, J, kh * kw,
                            cl, disjoint);
    });
    return {gc.to(type), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// cents [M, kh, kw]; rows [N, J] int32 (centroid row of each kernel, -1 for a zero kernel);
// disjoint: the caller knows that no row appears in two columns (the backward is then parallel)
at::Tensor expand_weight(const at::Tensor& cents, const at::Tensor& rows, bool channels_last, bool disjoint) {
  TORCH_CHECK(cents.dim() == 3 && cents.device().is_cpu(), "expand_weight: cents must be [M, kh, kw] on the CPU");
  TORCH_CHECK(rows.dim() == 2 && rows.scalar_type() == at::kInt && rows.is_contiguous() && rows.device().is_cpu(),
              "expand_weight: rows must be a contiguous int32 [N, J] CPU tensor");
  const int32_t* r = rows.data_ptr<int32_t>();
  const int64_t M = cents.size(0);
  bool ok = true;
  for (int64_t i = 0; i < rows.numel(); ++i) ok &= r[i] >= -1 && r[i] < M;
  TORCH_CHECK(ok, "expand_weight: a row index is out of range");
  return ExpandWeight::apply(cents, rows, channels_last, disjoint);
}

// and plain Python functions for eager calls: about 3 us less per call than going through
// the dispatcher (a layer at batch 1 takes tens of microseconds)
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fused_conv", &fused_conv);
  m.def("expand_weight", &expand_weight);
}
"""

_CHUNK_ROWS = 128  # centroid rows per chunk: 128 x 32 floats = 16 KiB of responses


def chunk_rows(out_channels: int) -> int:
    """Centroid rows per chunk of kept channels: at least 128 (their responses for one tile, 128
    bytes a row, stay in the L1 cache during the fusion), and 2 per output channel for wide
    layers. Each chunk reloads and stores the tile's N accumulators; from N = 128 on they no
    longer fit in L1 with the responses, and chunks of 2N rows (in L2) amortise that over more
    channels. Against chunks of 128 rows on torchvision ResNet-50 (G=5, T=1; ``python
    benchmarks/kernel_ab.py --resnet50 --against-chunk-rows 128``): 1.25x faster over all layers
    at batch 1, 1.30x at batch 16 (3x3 layers with N = 256: 1.10x-1.23x, N = 512: 1.27x-1.40x).
    On ResNet-56 (N <= 64) chunks of 192 and 256 rows were slower than 128."""
    return max(_CHUNK_ROWS, 2 * out_channels)
_lock = threading.Lock()
_module = None  # the compiled extension (a Python module that also registers the operator)
_error: Optional[str] = None


def _build():
    global _module, _error
    with _lock:
        if _module is not None or _error is not None:
            return _module
        if os.environ.get("KSE_NO_EXTENSION"):
            _error = "disabled by KSE_NO_EXTENSION"
            return None
        import logging

        def no_cuda_note(record: logging.LogRecord) -> bool:  # irrelevant for a CPU-only build
            return "No CUDA runtime is found" not in record.getMessage()

        log = logging.getLogger("torch.utils.cpp_extension")
        log.addFilter(no_cuda_note)
        try:
            from torch.utils.cpp_extension import load_inline

            # loading the module also registers the operator torch.ops.kse.fused_conv
            _module = load_inline(name="kse_fused_v23", cpp_sources=_SOURCE, with_cuda=False, is_python_module=True,
                                   no_implicit_headers=True,
                                   extra_cflags=["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp"],
                                   extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as exc:  # noqa: BLE001 - no compiler / ninja: the stock forms remain
            _error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        finally:
            log.removeFilter(no_cuda_note)
        return _module


def loaded() -> bool:
    """Whether the extension is already loaded (or known not to build) in this process: calling
    :func:`available` then costs nothing."""
    return _module is not None or _error is not None


def available() -> bool:
    """Whether the fused kernel is compiled and usable (builds it on first call)."""
    return _module is not None or _build() is not None


def library_path() -> Optional[str]:
    """The compiled operator library (builds it on first call; ``None`` if it did not build).

    A TorchScript model exported with fused layers calls ``torch.ops.kse.fused_conv``: load this
    library first, with ``kse.fused.available()`` in Python or ``torch.ops.load_library(path)``."""
    module = _build()
    return module.__file__ if module is not None else None


def build_error() -> Optional[str]:
    """Why the extension is unavailable (``None`` when it built)."""
    _build()
    return _error


def supports(layer) -> bool:
    """The layer shapes the kernel handles: stride 1, dilation 1, float32, at least one kept
    channel, the same padding on both sides of each axis (numbers, ``"valid"``, or ``"same"``
    with an odd kernel)."""
    return (tuple(layer.stride) == (1, 1) and tuple(layer.dilation) == (1, 1)
            and layer.centroids.dtype == torch.float32 and len(layer.kept_channels) > 0
            and layer.kernel_padding() is not None)


def prepare(layer, rows_per_chunk: Optional[int] = None) -> dict:
    """The index tensors the kernel reads, from a :class:`kse.KSEConv2d` (chunks of at most
    ``rows_per_chunk`` centroid rows; default :func:`chunk_rows`)."""
    counts = layer.centroid_counts.to(torch.int64)
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int32)
    offsets[1:] = counts.cumsum(0).to(torch.int32)
    kh, kw = layer.kernel_size
    scale, bias = layer._affine()  # outputs = scale * sum + bias (a folded BatchNorm, or 1 and the bias)
    relu = layer._epilogue is not None and layer._epilogue[2]
    starts, rows, limit = [0], 0, rows_per_chunk or chunk_rows(layer.out_channels)
    for c, q in enumerate(counts.tolist()):
        if rows and rows + q > limit:
            starts.append(c)
            rows = 0
        rows += q
    starts.append(len(counts))
    return {"kept": layer.kept_channels.to(torch.int64).cpu().contiguous(),
            "chunks": torch.tensor(starts, dtype=torch.int32),
            "cents": layer.centroids.detach().reshape(-1, kh * kw).float().contiguous(),
            "offsets": offsets.contiguous(),
            "assign": layer.assignment.t().to(torch.int32).contiguous(),
            "scale": scale.float().cpu().contiguous(), "bias": bias.float().cpu().contiguous(), "relu": relu}


def expand_weight(centroids: Tensor, rows: Tensor, channels_last: bool, disjoint: bool = False) -> Tensor:
    """``W'[n, j] = centroids[rows[n, j]]`` (zero where ``rows[n, j] < 0``) as a ``[N, J, kh,
    kw]`` tensor laid out ``channels_last`` or NCHW, differentiable in ``centroids`` (the gradient
    of a centroid is the sum of its kernels' gradients). ``centroids: [M, kh, kw]`` on the CPU,
    ``rows``: contiguous int32. One call and one autograd node (C++); the stock operations it
    replaces are :func:`kse.conv.gather_elements` and its views. With ``disjoint`` (only if no
    centroid row appears in two columns ``j``, as in a KSE layer, where every input channel has
    its own centroids) the backward reduces the columns in parallel."""
    module = _module if _module is not None else _build()
    if module is None:
        raise RuntimeError(f"the KSE extension is unavailable ({_error})")
    return module.expand_weight(centroids, rows, channels_last, disjoint)


def fused_conv(x: Tensor, tensors: dict, kernel_size, padding) -> Tensor:
    """Run the kernel: ``x: [B, C, H, W]`` float32 on the CPU -> ``[B, N, H', W']``."""
    module = _module if _module is not None else _build()
    if module is None:
        raise RuntimeError(f"the fused KSE kernel is unavailable ({_error}); use the dense, full or split form")
    # under torch.jit.trace the operator, which the trace records; else the direct binding
    fn = torch.ops.kse.fused_conv if torch.jit.is_tracing() else module.fused_conv
    return fn(x, tensors["kept"], tensors["cents"], tensors["offsets"], tensors["assign"], tensors["scale"],
              tensors["bias"], tensors["chunks"], kernel_size[0], kernel_size[1], padding[0], padding[1],
              tensors["relu"])
