"""Fused centroid convolution + channel fusion for KSE layers on the CPU (KSE.md §7).

The paper's split form, in one pass over each tile of 16 output pixels:

    r[c, j]  = sum_{i, k} x[c, p + tap(i, k)] * B_c[j][i, k]     (2D part: q_c centroids of channel c)
    y[n]     = bias[n] + sum_{c kept} r[c, idx_c[n]]              (fusion: one add per kept channel)

so it costs ``sum_c q_c * kh * kw`` multiply-adds plus ``N * C_kept`` adds per pixel, against
``N * C * kh * kw`` for the dense convolution. The centroid responses of a tile stay in cache
(``sum_c q_c`` vectors of 16 floats) and the fusion reads them by index.

Stride 1, no dilation, float32 (other layers keep the stock forms). The pixels of a tile run
along the rows of the zero-padded input, so a 3x3 tap is a fixed offset and every load is a
contiguous vector; the two columns of padding per row are computed and dropped. The extension
is compiled on first use with ``torch.utils.cpp_extension.load_inline`` (a C++ compiler and
ninja are needed; about 20-40 s once, then cached); ``available()`` says whether it built.
"""

from __future__ import annotations

import os
import threading
from typing import Optional

import torch
from torch import Tensor

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <vector>
#include <cstring>

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
static const int L = 16;   // floats per vector
static const int V = 2;    // vectors per tile: each centroid weight is used for 2 x 16 pixels
static const int TL = L * V;

static inline v16 load(const float* p) { return *reinterpret_cast<const v16u*>(p); }
static inline void store(float* p, v16 v) { *reinterpret_cast<v16u*>(p) = v; }

// centroid responses of one tile: R[r] (TL floats) for every centroid row r of every kept channel
template <int KK>
static void tile_centroids(const float* xp, int64_t plane, int64_t t0, const int64_t* taps, int K,
                           const int32_t* offsets, const float* cents, int kk, float* R) {
  for (int c = 0; c < K; ++c) {
    const float* xc = xp + c * plane + t0;
    const int32_t r0 = offsets[c], r1 = offsets[c + 1];
    if (KK > 0) {
      v16 X[KK][V];
      for (int i = 0; i < KK; ++i) for (int v = 0; v < V; ++v) X[i][v] = load(xc + taps[i] + v * L);
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
          v16 acc = load(xc + taps[0] + v * L) * w[0];
          for (int i = 1; i < kk; ++i) acc += load(xc + taps[i] + v * L) * w[i];
          store(R + (int64_t)r * TL + v * L, acc);
        }
      }
    }
  }
}

torch::Tensor fused_conv(torch::Tensor x, torch::Tensor kept, torch::Tensor cents, torch::Tensor offsets,
                         torch::Tensor assign, torch::Tensor bias, int64_t kh, int64_t kw, int64_t ph, int64_t pw) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == torch::kFloat, "x must be float32 [B, C, H, W]");
  x = x.contiguous();
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int K = kept.size(0), N = assign.size(0), Q = cents.size(0), kk = kh * kw;
  const int64_t Hp = H + 2 * ph, Wp = W + 2 * pw, Ho = Hp - kh + 1, Wo = Wp - kw + 1;
  TORCH_CHECK(Ho > 0 && Wo > 0, "input smaller than the kernel");
  const int64_t T = Ho * Wp;                       // outputs on the padded-width grid
  const int64_t ntiles = (T + TL - 1) / TL, Tp = ntiles * TL;
  const int64_t plane = Tp + (kh - 1) * Wp + kw + TL;  // padded plane + slack read by the last tile
  auto xp = torch::zeros({B, (int64_t)K, plane}, x.options());
  auto grid = torch::empty({B, (int64_t)N, Tp}, x.options());  // outputs on the padded-width grid
  const float* xs = x.data_ptr<float>();
  float* xps = xp.data_ptr<float>();
  const int64_t* kp = kept.data_ptr<int64_t>();
  at::parallel_for(0, B * K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bc = begin; bc < end; ++bc) {
      const int64_t b = bc / K, c = bc % K;
      const float* src = xs + (b * C + kp[c]) * H * W;
      float* dst = xps + bc * plane;
      for (int64_t h = 0; h < H; ++h) std::memcpy(dst + (h + ph) * Wp + pw, src + h * W, W * sizeof(float));
    }
  });
  std::vector<int64_t> taps(kk);
  for (int i = 0; i < kh; ++i) for (int j = 0; j < kw; ++j) taps[i * kw + j] = i * Wp + j;
  const float* cs = cents.data_ptr<float>();
  const int32_t* os = offsets.data_ptr<int32_t>();
  const int32_t* as = assign.data_ptr<int32_t>();
  const float* bs = bias.data_ptr<float>();
  float* gs = grid.data_ptr<float>();
  at::parallel_for(0, B * ntiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> Rbuf((int64_t)Q * TL + TL);
    float* R = Rbuf.data();
    for (int64_t bt = begin; bt < end; ++bt) {
      const int64_t b = bt / ntiles, t0 = (bt % ntiles) * TL;
      const float* xb = xps + b * K * plane;
      if (kk == 9) tile_centroids<9>(xb, plane, t0, taps.data(), K, os, cs, kk, R);
      else if (kk == 1) tile_centroids<1>(xb, plane, t0, taps.data(), K, os, cs, kk, R);
      else tile_centroids<0>(xb, plane, t0, taps.data(), K, os, cs, kk, R);
      float* gb = gs + b * N * Tp + t0;
      for (int n = 0; n < N; ++n) {                // channel fusion: one add per kept channel
        const int32_t* an = as + (int64_t)n * K;
        v16 acc[V];
        for (int v = 0; v < V; ++v) acc[v] = load(R + (int64_t)an[0] * TL + v * L);
        for (int c = 1; c < K; ++c) {
          const float* rc = R + (int64_t)an[c] * TL;
          for (int v = 0; v < V; ++v) acc[v] += load(rc + v * L);
        }
        for (int v = 0; v < V; ++v) store(gb + n * Tp + v * L, acc[v] + bs[n]);
      }
    }
  });
  // drop the padding columns: [B, N, Ho, Wp] grid -> [B, N, Ho, Wo]
  return grid.narrow(2, 0, T).view({B, (int64_t)N, Ho, Wp}).narrow(3, 0, Wo).contiguous();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("fused_conv", &fused_conv, "KSE fused centroid conv + fusion"); }
"""

_lock = threading.Lock()
_module = None
_error: Optional[str] = None


def _build():
    global _module, _error
    with _lock:
        if _module is not None or _error is not None:
            return _module
        if os.environ.get("KSE_NO_EXTENSION"):
            _error = "disabled by KSE_NO_EXTENSION"
            return None
        try:
            from torch.utils.cpp_extension import load_inline

            _module = load_inline(name="kse_fused_v2", cpp_sources=_SOURCE, with_cuda=False,
                                  extra_cflags=["-O3", "-march=native", "-mprefer-vector-width=512"], verbose=False)
        except Exception as exc:  # noqa: BLE001 - no compiler / ninja: the stock forms remain
            _error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        return _module


def available() -> bool:
    """Whether the fused kernel is compiled and usable (builds it on first call)."""
    return _build() is not None


def build_error() -> Optional[str]:
    """Why the extension is unavailable (``None`` when it built)."""
    _build()
    return _error


def supports(layer) -> bool:
    """The layer shapes the kernel handles: stride 1, dilation 1, float32, at least one kept channel."""
    return (tuple(layer.stride) == (1, 1) and tuple(layer.dilation) == (1, 1)
            and layer.centroids.dtype == torch.float32 and len(layer.kept_channels) > 0)


def prepare(layer) -> dict:
    """The index tensors the kernel reads, from a :class:`kse.KSEConv2d`."""
    counts = layer.centroid_counts.to(torch.int64)
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int32)
    offsets[1:] = counts.cumsum(0).to(torch.int32)
    kh, kw = layer.kernel_size
    bias = layer.bias.detach() if layer.bias is not None else torch.zeros(layer.out_channels)
    return {"kept": layer.kept_channels.to(torch.int64).cpu().contiguous(),
            "cents": layer.centroids.detach().reshape(-1, kh * kw).float().contiguous(),
            "offsets": offsets.contiguous(),
            "assign": layer.assignment.t().to(torch.int32).contiguous(),
            "bias": bias.float().contiguous()}


def fused_conv(x: Tensor, tensors: dict, kernel_size, padding) -> Tensor:
    """Run the kernel: ``x: [B, C, H, W]`` float32 on the CPU -> ``[B, N, H', W']``."""
    mod = _build()
    if mod is None:
        raise RuntimeError(f"the fused KSE kernel is unavailable ({_error}); use the dense, full or split form")
    return mod.fused_conv(x, tensors["kept"], tensors["cents"], tensors["offsets"], tensors["assign"],
                          tensors["bias"], kernel_size[0], kernel_size[1], padding[0], padding[1])
