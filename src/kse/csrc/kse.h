// The CPU kernels of the kse:: operators (schemas in ops.cpp, Python side in kse/ops.py).
#pragma once

#include <ATen/ATen.h>

namespace kse {

// Fused centroid convolution + channel fusion of a KSE layer (fused_conv.cpp):
// x [B, C, H, W] float32 -> [B, N, H', W'].
at::Tensor fused_conv(at::Tensor x, at::Tensor kept, at::Tensor cents, at::Tensor offsets, at::Tensor assign,
                      at::Tensor scale, at::Tensor bias, at::Tensor chunks, int64_t kh, int64_t kw, int64_t ph,
                      int64_t pw, bool relu);

// The training weight W'[n, j] = cents[rows[n, j]] and its backward (expand_weight.cpp).
at::Tensor expand_weight(const at::Tensor& cents, const at::Tensor& rows, bool channels_last, bool disjoint);
at::Tensor expand_weight_backward(const at::Tensor& grad, const at::Tensor& rows, int64_t num_centroids,
                                  bool channels_last, bool disjoint);

// Their autograd kernels (autograd.cpp): expand_weight differentiable in cents, expand_weight_backward
// in grad.
at::Tensor expand_weight_autograd(const at::Tensor& cents, const at::Tensor& rows, bool channels_last,
                                  bool disjoint);
at::Tensor expand_weight_backward_autograd(const at::Tensor& grad, const at::Tensor& rows, int64_t num_centroids,
                                           bool channels_last, bool disjoint);

}  // namespace kse
