// Shared helpers for the kdforge._C kernels: argument checks with full messages and small parsing helpers.
// The operator schemas live in registration.cpp (declared once); each op has one implementation per dispatch key
// under ops/<op>/cpu and ops/<op>/cuda.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <sstream>
#include <string>
#include <string_view>

namespace kdforge {

// "[4, 197, 384]" for messages.
inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

enum class LossKind { SmoothL1, Mse };
enum class Reduction { Mean, Sum, None };
enum class Metric { InnerProduct, L2 };

inline LossKind parse_loss(std::string_view loss) {
  if (loss == "smooth_l1") return LossKind::SmoothL1;
  if (loss == "mse") return LossKind::Mse;
  TORCH_CHECK(false, "whitened_loss: loss must be \"smooth_l1\" or \"mse\", got \"", loss, "\"");
}

inline Reduction parse_reduction(std::string_view reduction) {
  if (reduction == "mean") return Reduction::Mean;
  if (reduction == "sum") return Reduction::Sum;
  if (reduction == "none") return Reduction::None;
  TORCH_CHECK(false, "whitened_loss: reduction must be \"mean\", \"sum\" or \"none\", got \"", reduction, "\"");
}

inline Metric parse_metric(std::string_view metric) {
  if (metric == "ip") return Metric::InnerProduct;
  if (metric == "l2") return Metric::L2;
  TORCH_CHECK(false, "knn: metric must be \"ip\" (inner product, largest first) or \"l2\" (squared distance, ",
              "smallest first), got \"", metric, "\"");
}

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

// Accumulation (and loss / score) dtype: float32, float64 for float64 inputs.
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Checks shared by the CPU and CUDA whitened_loss implementations. Returns the number of rows R of the [R, D] view.
inline int64_t check_whitened_loss_args(const at::Tensor& student, const at::Tensor& teacher,
                                        const std::optional<at::Tensor>& index, double beta, double eps) {
  TORCH_CHECK(student.dim() >= 1 && student.size(-1) > 0,
              "whitened_loss: student must be [..., D] with D >= 1, got ", shape_str(student));
  TORCH_CHECK(teacher.sizes() == student.sizes(), "whitened_loss: teacher must be [..., D] like student, got teacher ",
              shape_str(teacher), " and student ", shape_str(student),
              " (project the student to the teacher's width first)");
  TORCH_CHECK(teacher.scalar_type() == student.scalar_type(),
              "whitened_loss: teacher and student must share one dtype, got teacher ", teacher.scalar_type(),
              " and student ", student.scalar_type(), " (kdforge._ext.whitened_loss promotes them for you)");
  TORCH_CHECK(is_supported_float(student.scalar_type()),
              "whitened_loss: student must be float32, bfloat16, float16 or float64, got ", student.scalar_type());
  TORCH_CHECK(teacher.device() == student.device(), "whitened_loss: teacher must be on the student's device ",
              student.device(), ", got ", teacher.device());
  TORCH_CHECK(beta >= 0.0, "whitened_loss: beta must be >= 0 (smooth-L1 threshold), got ", beta);
  TORCH_CHECK(eps >= 0.0, "whitened_loss: eps must be >= 0, got ", eps);
  const int64_t rows = student.numel() / student.size(-1);
  if (index.has_value()) {
    const at::Tensor& idx = *index;
    TORCH_CHECK(idx.dim() == 1, "whitened_loss: index must be a 1-D LongTensor of flat row positions, got shape ",
                shape_str(idx));
    TORCH_CHECK(idx.scalar_type() == at::kLong, "whitened_loss: index must be int64 (LongTensor), got ",
                idx.scalar_type(), "; convert it with index.long()");
    TORCH_CHECK(idx.device() == student.device(), "whitened_loss: index must be on the student's device ",
                student.device(), ", got ", idx.device());
  }
  return rows;
}

inline void check_masked_rows_mask(const char* op, const at::Tensor& mask, int64_t batch, int64_t tokens,
                                   const at::Device& device) {
  TORCH_CHECK(mask.scalar_type() == at::kBool, op, ": mask must be a bool tensor [B, N], got ", mask.scalar_type(),
              "; build it with a comparison or mask.bool()");
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == batch && mask.size(1) == tokens, op, ": mask must be [B, N] = [",
              batch, ", ", tokens, "] to match the rows' tensor, got ", shape_str(mask));
  TORCH_CHECK(mask.device() == device, op, ": mask must be on ", device, ", got ", mask.device());
}

// Checks shared by the CPU and CUDA masked_scatter implementations: out [B, N, D], mask [B, N], rows [M, D] with
// out's D, dtype and device (M against the mask's count is checked by each implementation).
inline void check_masked_scatter_args(const at::Tensor& rows, const at::Tensor& mask, const at::Tensor& out) {
  TORCH_CHECK(out.dim() == 3, "masked_scatter: out must be [B, N, D], got ", shape_str(out));
  check_masked_rows_mask("masked_scatter", mask, out.size(0), out.size(1), out.device());
  const int64_t D = out.size(2);
  TORCH_CHECK(rows.dim() == 2 && rows.size(1) == D, "masked_scatter: rows must be [M, D] with D = ", D,
              " like out, got ", shape_str(rows));
  TORCH_CHECK(rows.scalar_type() == out.scalar_type(), "masked_scatter: rows must have out's dtype ",
              out.scalar_type(), ", got ", rows.scalar_type());
  TORCH_CHECK(rows.device() == out.device(), "masked_scatter: rows must be on out's device ", out.device(),
              ", got ", rows.device());
}

// Checks shared by the knn implementations.
inline void check_knn_args(const at::Tensor& queries, const at::Tensor& gallery, int64_t k,
                           std::optional<int64_t> chunk_size) {
  TORCH_CHECK(queries.dim() == 2, "knn: queries must be [Q, D], got ", shape_str(queries));
  TORCH_CHECK(gallery.dim() == 2 && gallery.size(1) == queries.size(1), "knn: gallery must be [G, D] with D = ",
              queries.size(1), " like queries, got ", shape_str(gallery));
  TORCH_CHECK(at::isFloatingType(queries.scalar_type()) && at::isFloatingType(gallery.scalar_type()),
              "knn: queries and gallery must be floating point, got ", queries.scalar_type(), " and ",
              gallery.scalar_type());
  TORCH_CHECK(k >= 1 && k <= gallery.size(0), "knn: k must be in [1, G] where G = ", gallery.size(0),
              " gallery rows, got k = ", k);
  TORCH_CHECK(!chunk_size.has_value() || *chunk_size >= 1, "knn: chunk_size must be >= 1 or None, got ",
              chunk_size.value_or(0));
}

}  // namespace kdforge
