// kse::fused_conv, the fused centroid convolution + channel fusion of a KSE layer on the CPU
// (KSE, Li et al., CVPR 2019, Sec. 3.5 and Fig. 2). In one pass over each tile of 32 output pixels:
//
//   r[c, j] = sum_{i, k} x[c, p + tap(i, k)] * B_c[j][i, k]    (2D part: q_c centroids of channel c)
//   y[n]    = s[n] * sum_{c kept} r[c, idx_c[n]] + b[n]        (fusion: one add per kept channel)
//
// (then an optional ReLU), so it costs sum_c q_c * kh * kw multiply-adds plus N * C_kept adds per
// pixel, against N * C * kh * kw for the dense convolution. The kept channels are taken in chunks
// whose centroid responses (at least 128 rows of 32 floats, 2N for wide layers: kse.ops.chunk_rows)
// stay in cache while the fusion reads them by index, four outputs at a time; the outputs of a tile
// stay in a buffer of N x 32 floats until the last chunk, then its valid pixels are written out.
//
// Stride 1, no dilation, float32. The pixels of a tile are consecutive, so a tap is a fixed offset
// and every load is a contiguous vector. Same-size convolutions (padding (k - 1) / 2) lay the input
// planes of all images end to end without padding and mask the taps that fall outside their image
// (a tile may span images); they read a channels_last input as it is and answer channels_last.
// Other layers use a zero-padded plane per image. Tiles are spread over torch's threads.
#include "kse.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

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
// compiler lay out the tile loop differently, and the kernel slower (benchmarks/kernel_ab.py)
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
  // branch-free scans (one check after each loop): they run on every call, at batch 1 too
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
// image, else zero; built once per shape (not on every call: small next to a layer at batch 1)
// and kept, at most 64 MiB of them (2 MiB for a 3x3 kernel on a 224x224 map)
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

namespace kse {

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
  // tiles), the compact one 49 (benchmarks/kernel_ab.py compares kernels layer by layer).
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

}  // namespace kse

TORCH_LIBRARY_IMPL(kse, CPU, m) { m.impl("fused_conv", TORCH_FN(kse::fused_conv)); }
