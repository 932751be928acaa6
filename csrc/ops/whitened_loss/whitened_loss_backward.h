// kdforge::whitened_loss_backward, shared by the CPU and CUDA implementations: the checks, the per-row scaling of
// grad_rows for reduction "none" and the scatter to the student's shape are the same ATen calls on either device;
// only the scaling by a 0-dim grad_loss differs (the CPU reads it as a host scalar, CUDA keeps it on the device).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/zeros.h>
#include <c10/util/accumulate.h>

#include <optional>

#include "../../kdforge.h"

namespace kdforge {

// grad_student = grad_loss * grad_rows (per row for reduction "none"), scattered to the selected rows when an index
// was given (index_add_: a row selected twice gets both contributions).
// grad_rows: the forward's dS, [..., D] like the student, or [len(index), D]; grad_loss: 0-dim, or [n] for "none".
// scale_by_scalar(rows, grad_loss) -> rows * grad_loss in rows' dtype, called when grad_loss is 0-dim.
template <typename ScaleByScalar>
at::Tensor whitened_loss_grad_student(const at::Tensor& grad_loss, const at::Tensor& grad_rows,
                                       const std::optional<at::Tensor>& index, at::IntArrayRef shape,
                                       ScaleByScalar scale_by_scalar) {
  TORCH_CHECK(!shape.empty(), "whitened_loss_backward: student_shape must be [..., D], got []");
  const int64_t D = shape.back();
  const int64_t n = D > 0 ? grad_rows.numel() / D : 0;
  TORCH_CHECK(grad_loss.numel() == 1 || grad_loss.numel() == n,
              "whitened_loss_backward: grad_loss must hold one value, or one per selected row (", n,
              ") for reduction \"none\", got shape ", shape_str(grad_loss));
  const at::Tensor rows = grad_rows.contiguous();
  at::Tensor scaled;
  if (grad_loss.dim() == 0) {
    scaled = scale_by_scalar(rows, grad_loss);
  } else {
    scaled = at::mul(rows.reshape({n, D}), grad_loss.reshape({n, 1})).to(rows.scalar_type());
  }
  if (!index.has_value()) {
    TORCH_CHECK(rows.numel() == c10::multiply_integers(shape), "whitened_loss_backward: grad_rows must have the ",
                "student's shape ", shape, ", got ", shape_str(rows));
    return scaled.reshape(shape);
  }
  const int64_t R = D > 0 ? c10::multiply_integers(shape) / D : 0;
  TORCH_CHECK(rows.dim() == 2 && rows.size(0) == index->numel() && rows.size(1) == D,
              "whitened_loss_backward: grad_rows must be [len(index), D] = [", index->numel(), ", ", D, "], got ",
              shape_str(rows));
  at::Tensor out = at::zeros({R, D}, rows.options());
  out.index_add_(0, *index, scaled.reshape({n, D}));
  return out.view(shape);
}

}  // namespace kdforge
