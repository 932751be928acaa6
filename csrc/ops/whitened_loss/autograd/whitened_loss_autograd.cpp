// kdforge::whitened_loss, Autograd key (every device): the forward already returns dS = dloss/dstudent, so the
// backward only scales it by grad_output (kdforge::whitened_loss_backward). Written in C++ rather than with
// torch.library.register_autograd because the Python path costs ~0.3 ms per forward + backward, a third of the
// fused kernel's time at [4k, 384] on the CPU.
//
// loss.backward() on the CPU passes grad_output = 1: then dS already is the gradient and is handed over as is
// (autograd moves it into .grad, or copies it when the graph is retained), saving one [R, D] buffer and pass.
// Reading grad_output's value is free on the CPU; it is never done on a GPU (a synchronisation) or under tracing
// (torch.compile, fake or functional tensors, torch.func), where the value is unknown.
#include <ATen/TensorSubclassLikeUtils.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace kdforge {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor> call_forward(const at::Tensor& student, const at::Tensor& teacher,
                                                const std::optional<at::Tensor>& index, c10::string_view loss,
                                                double beta, bool whiten, double eps, c10::string_view reduction) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("kdforge::whitened_loss", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const std::optional<at::Tensor>&, c10::string_view,
                                                                 double, bool, double, c10::string_view)>();
  return op.call(student, teacher, index, loss, beta, whiten, eps, reduction);
}

at::Tensor call_backward(const at::Tensor& grad_loss, const at::Tensor& grad_rows,
                         const std::optional<at::Tensor>& index, c10::SymIntArrayRef student_shape) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("kdforge::whitened_loss_backward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         c10::SymIntArrayRef)>();
  return op.call(grad_loss, grad_rows, index, student_shape);
}

// grad is a plain eager CPU scalar equal to 1.
bool is_plain_cpu_one(const at::Tensor& grad) {
  if (!grad.defined() || !grad.device().is_cpu() || grad.dim() != 0 || at::isTensorSubclassLike(grad)) return false;
  if (c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::Python)) return false;  // a dispatch mode is on
  return grad.item<double>() == 1.0;
}

class WhitenedLoss : public torch::autograd::Function<WhitenedLoss> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& student, const at::Tensor& teacher,
                               const std::optional<at::Tensor>& index, c10::string_view loss, double beta,
                               bool whiten, double eps, c10::string_view reduction) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [value, grad_rows] = call_forward(student, teacher, index, loss, beta, whiten, eps, reduction);
    ctx->save_for_backward({grad_rows, index.value_or(at::Tensor())});
    ctx->saved_data["student_shape"] = student.sym_sizes().vec();
    ctx->mark_non_differentiable({grad_rows});
    // grad_rows is an output only to be saved: without this autograd would build a zero gradient for it.
    ctx->set_materialize_grads(false);
    return {value, grad_rows};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& grad_rows = saved[0];
    const std::optional<at::Tensor> index =
        saved[1].defined() ? std::optional<at::Tensor>(saved[1]) : std::nullopt;
    at::Tensor grad_student;
    if (grads[0].defined() && ctx->needs_input_grad(0)) {
      if (!index.has_value() && is_plain_cpu_one(grads[0])) {
        grad_student = grad_rows;
      } else {
        const std::vector<c10::SymInt> shape = ctx->saved_data["student_shape"].toSymIntList().vec();
        grad_student = call_backward(grads[0], grad_rows, index, shape);
      }
    }
    // One entry per forward input: student, teacher, index, loss, beta, whiten, eps, reduction.
    return {grad_student, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> whitened_loss_autograd(const at::Tensor& student, const at::Tensor& teacher,
                                                          const std::optional<at::Tensor>& index,
                                                          c10::string_view loss, double beta, bool whiten,
                                                          double eps, c10::string_view reduction) {
  auto out = WhitenedLoss::apply(student, teacher, index, loss, beta, whiten, eps, reduction);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdforge, Autograd, m) { m.impl("whitened_loss", &whitened_loss_autograd); }

}  // namespace kdforge
