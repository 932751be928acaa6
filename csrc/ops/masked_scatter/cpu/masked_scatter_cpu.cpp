// kdforge::masked_scatter, CPU: a new [B, N, D] tensor equal to out, with the rows where mask [B, N] is true
// replaced, in row-major order, by rows [M, D]. Fused into one pass: every output row is copied once, either from
// rows or from out (no clone-then-overwrite). Any dtype; out may have any strides with a unit stride on D.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "../../../kdforge.h"

namespace kdforge::cpu {
namespace {

at::Tensor masked_scatter_cpu(const at::Tensor& rows_in, const at::Tensor& mask_in, const at::Tensor& out_in) {
  check_masked_scatter_args(rows_in, mask_in, out_in);
  const int64_t B = out_in.size(0), N = out_in.size(1), D = out_in.size(2);

  const at::Tensor mask = mask_in.contiguous();
  const bool* m = mask.const_data_ptr<bool>();
  // pos[j]: index into rows of flat row j when masked (exclusive prefix count of the mask).
  std::vector<int64_t> pos(static_cast<size_t>(B * N));
  int64_t count = 0;
  for (int64_t j = 0; j < B * N; ++j) {
    pos[j] = count;
    count += m[j] ? 1 : 0;
  }
  TORCH_CHECK(rows_in.size(0) == count, "masked_scatter: rows must have one row per true mask entry (mask has ",
              count, " true), got ", rows_in.size(0), " rows");

  const at::Tensor rows = rows_in.contiguous();
  const at::Tensor out = out_in.stride(2) == 1 ? out_in : out_in.contiguous();
  at::Tensor result = at::empty({B, N, D}, out.options().memory_format(at::MemoryFormat::Contiguous));
  if (B * N == 0 || D == 0) return result;

  const int64_t esize = out.element_size();
  const size_t row_bytes = static_cast<size_t>(D) * esize;
  const int64_t sb = out.stride(0) * esize, sn = out.stride(1) * esize;
  const char* rp = static_cast<const char*>(rows.const_data_ptr());
  const char* op = static_cast<const char*>(out.const_data_ptr());
  char* dp = static_cast<char*>(result.mutable_data_ptr());
  const int64_t grain = std::max<int64_t>(1, 65536 / static_cast<int64_t>(row_bytes));
  at::parallel_for(0, B * N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const char* from = m[j] ? rp + pos[j] * row_bytes : op + (j / N) * sb + (j % N) * sn;
      std::memcpy(dp + j * row_bytes, from, row_bytes);
    }
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdforge, CPU, m) { m.impl("masked_scatter", &masked_scatter_cpu); }

}  // namespace kdforge::cpu
