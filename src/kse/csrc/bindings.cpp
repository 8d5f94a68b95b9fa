// Direct Python bindings of kse::fused_conv's kernel and kse::expand_weight's autograd kernel, for
// eager calls (kse.ops): they skip the Python operator object and a trip through the dispatcher,
// whose per-call cost shows at batch 1 and in the once-per-layer W' of a training step
// (kse.ops.set_direct_calls switches them off). Tracing, compiling and exporting call the
// operators instead.
#include <torch/csrc/utils/pybind.h>

#include "kse.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fused_conv", &kse::fused_conv);
  m.def("expand_weight", &kse::expand_weight_autograd);
}
