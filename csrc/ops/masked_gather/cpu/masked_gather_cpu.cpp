// kdforge::masked_gather, CPU: the rows of x [B, N, D] where mask [B, N] is true, in row-major order -> [M, D].
// One serial scan of the mask lists the source rows (B * N bytes, cheap); the row copies run in parallel.
// Works for any dtype (rows are copied as bytes) and any strides with a unit stride on D, so a slice such as
// x[:, 1:] (dropping a CLS token) is read in place without a contiguous copy.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "../../../kdforge.h"

namespace kdforge::cpu {
namespace {

at::Tensor masked_gather_cpu(const at::Tensor& x_in, const at::Tensor& mask_in) {
  TORCH_CHECK(x_in.dim() == 3, "masked_gather: x must be [B, N, D], got ", shape_str(x_in));
  check_masked_rows_mask("masked_gather", mask_in, x_in.size(0), x_in.size(1), x_in.device());
  const at::Tensor x = x_in.stride(2) == 1 ? x_in : x_in.contiguous();
  const at::Tensor mask = mask_in.contiguous();
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);

  const bool* m = mask.const_data_ptr<bool>();
  std::vector<int64_t> src;  // flat (b * N + n) of each true entry, in order
  src.reserve(static_cast<size_t>(B * N));
  for (int64_t j = 0; j < B * N; ++j) {
    if (m[j]) src.push_back(j);
  }
  const int64_t M = static_cast<int64_t>(src.size());
  at::Tensor out = at::empty({M, D}, x.options());
  if (M == 0 || D == 0) return out;

  const size_t row_bytes = static_cast<size_t>(D) * x.element_size();
  const int64_t sb = x.stride(0) * x.element_size(), sn = x.stride(1) * x.element_size();
  const char* xp = static_cast<const char*>(x.const_data_ptr());
  char* op = static_cast<char*>(out.mutable_data_ptr());
  const int64_t grain = std::max<int64_t>(1, 65536 / static_cast<int64_t>(row_bytes));
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = src[i] / N, n = src[i] % N;
      std::memcpy(op + i * row_bytes, xp + b * sb + n * sn, row_bytes);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdforge, CPU, m) { m.impl("masked_gather", &masked_gather_cpu); }

}  // namespace kdforge::cpu
