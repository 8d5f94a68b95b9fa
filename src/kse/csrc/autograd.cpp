// Autograd of kse::expand_weight (KSE, Li et al., CVPR 2019, Sec. 3.4: centroids are trained, the
// assignment of kernels to centroids is frozen, so the gradient of a centroid is the sum of the
// gradients of its kernels). Its backward is the operator kse::expand_weight_backward, which is
// linear in the gradient with kse::expand_weight as its adjoint: each is the other's backward, so
// gradients of gradients (create_graph) work too. Both call the operators through the dispatcher,
// so that torch.compile and torch.export trace them (their fake kernels are in kse/ops.py).
//
// NOTE: the formulas are registered here, in C++ (as torchvision registers its operators'
// backward), not with torch.library.register_autograd in Python: that costs tens of microseconds
// more per call, and a training step builds W' once per layer (benchmarks/train_weight.py).
#include "kse.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_expand_weight(const at::Tensor& cents, const at::Tensor& rows, bool channels_last, bool disjoint) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("kse::expand_weight", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, bool, bool)>();
  return op.call(cents, rows, channels_last, disjoint);
}

at::Tensor call_expand_weight_backward(const at::Tensor& grad, const at::Tensor& rows, int64_t num_centroids,
                                       bool channels_last, bool disjoint) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("kse::expand_weight_backward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, bool, bool)>();
  return op.call(grad, rows, num_centroids, channels_last, disjoint);
}

struct ExpandWeight : public torch::autograd::Function<ExpandWeight> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& cents, const at::Tensor& rows, bool cl,
                            bool disjoint) {
    ctx->save_for_backward({rows});
    ctx->saved_data["cl"] = cl;
    ctx->saved_data["disjoint"] = disjoint;
    ctx->saved_data["M"] = cents.size(0);
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_expand_weight(cents, rows, cl, disjoint);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor rows = ctx->get_saved_variables()[0];
    const bool cl = ctx->saved_data["cl"].toBool(), disjoint = ctx->saved_data["disjoint"].toBool();
    const int64_t M = ctx->saved_data["M"].toInt();
    const at::Tensor& g = grads[0];
    if (!g.has_storage()) {
      // a batched gradient (autograd.grad(..., is_grads_batched=True)) has no storage: the same
      // sums with ATen operations, which vmap batches; W'[n, j, t] = cents[rows[n, j], t],
      // dropped kernels summed into a row M
      const int64_t kh = g.size(2), kw = g.size(3), D = kh * kw;
      const at::Tensor r = rows.to(at::kLong);
      const at::Tensor idx = (at::where(r >= 0, r, M).unsqueeze(2) * D + at::arange(D, r.options())).reshape({-1});
      const at::Tensor gc = at::zeros({(M + 1) * D}, g.options()).index_add(0, idx, g.reshape({-1}));
      return {gc.narrow(0, 0, M * D).view({M, kh, kw}), at::Tensor(), at::Tensor(), at::Tensor()};
    }
    if (g.requires_grad())  // create_graph: the operator's own autograd records this backward
      return {call_expand_weight_backward(g, rows, M, cl, disjoint), at::Tensor(), at::Tensor(), at::Tensor()};
    at::AutoDispatchBelowADInplaceOrView guard;  // else straight to the kernel (or a tracer's fake one)
    return {call_expand_weight_backward(g, rows, M, cl, disjoint), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

struct ExpandWeightBackward : public torch::autograd::Function<ExpandWeightBackward> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad, const at::Tensor& rows,
                            int64_t num_centroids, bool cl, bool disjoint) {
    ctx->save_for_backward({rows});
    ctx->saved_data["cl"] = cl;
    ctx->saved_data["disjoint"] = disjoint;
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_expand_weight_backward(grad, rows, num_centroids, cl, disjoint);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor rows = ctx->get_saved_variables()[0];
    const bool cl = ctx->saved_data["cl"].toBool(), disjoint = ctx->saved_data["disjoint"].toBool();
    return {call_expand_weight(grads[0], rows, cl, disjoint), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

}  // namespace

namespace kse {

at::Tensor expand_weight_autograd(const at::Tensor& cents, const at::Tensor& rows, bool channels_last,
                                  bool disjoint) {
  return ExpandWeight::apply(cents, rows, channels_last, disjoint);
}

at::Tensor expand_weight_backward_autograd(const at::Tensor& grad, const at::Tensor& rows, int64_t num_centroids,
                                           bool channels_last, bool disjoint) {
  return ExpandWeightBackward::apply(grad, rows, num_centroids, channels_last, disjoint);
}

}  // namespace kse

TORCH_LIBRARY_IMPL(kse, Autograd, m) {
  m.impl("expand_weight", TORCH_FN(kse::expand_weight_autograd));
  m.impl("expand_weight_backward", TORCH_FN(kse::expand_weight_backward_autograd));
}
