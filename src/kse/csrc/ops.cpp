// The kse:: operator schemas. Their CPU kernels are registered in fused_conv.cpp and
// expand_weight.cpp; their fake (meta) kernels, the autograd formula of expand_weight and a
// pure-PyTorch fallback of each are in kse/ops.py, which torch imports when it needs them.
#include <torch/library.h>

TORCH_LIBRARY(kse, m) {
  m.set_python_module("kse.ops");
  // a TorchScript file traced by an earlier kse calls this schema: keep it unchanged
  m.def("fused_conv(Tensor x, Tensor kept, Tensor cents, Tensor offsets, Tensor assign, Tensor scale, "
        "Tensor bias, Tensor chunks, int kh, int kw, int ph, int pw, bool relu) -> Tensor");
  m.def("expand_weight(Tensor cents, Tensor rows, bool channels_last, bool disjoint=False) -> Tensor");
  m.def("expand_weight_backward(Tensor grad, Tensor rows, int num_centroids, bool channels_last, "
        "bool disjoint=False) -> Tensor");
}
