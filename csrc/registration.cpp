// The kdforge operator library: every schema is declared here, once. Implementations register per dispatch key
// next to their kernels (ops/<op>/cpu/*.cpp -> CPU, ops/<op>/cuda/*.cu -> CUDA). Fake (meta) kernels and autograd
// formulas are registered from Python in kdforge/_ext.py, beside the functions that call these ops.
//
// Importing kdforge._C (this file's PyInit) loads the shared object, which runs the registrations below.
#include <Python.h>
#include <torch/library.h>

#include "cpu_capability.h"

TORCH_LIBRARY(kdforge, m) {
  // Loss and dS in one pass: returns (loss: 0-dim in the student's dtype, grad_rows: dloss/dstudent of the
  // selected rows, the student's shape without index, [len(index), D] with it).
  m.def(
      "whitened_loss(Tensor student, Tensor teacher, Tensor? index, str loss, float beta, bool whiten, float eps, "
      "str reduction) -> (Tensor, Tensor)");
  // grad_loss * grad_rows, scattered into zeros of student_shape when an index was used.
  m.def("whitened_loss_backward(Tensor grad_loss, Tensor grad_rows, Tensor? index, SymInt[] student_shape) -> Tensor");
  // x [B, N, D], mask bool [B, N] -> [M, D]: the rows where mask is true, row-major order.
  m.def("masked_gather(Tensor x, Tensor mask) -> Tensor");
  // rows [M, D], mask bool [B, N], out [B, N, D] -> new [B, N, D]: out with its masked rows replaced by rows.
  m.def("masked_scatter(Tensor rows, Tensor mask, Tensor out) -> Tensor");
  // queries [Q, D], gallery [G, D] -> (scores [Q, k] float32, indices [Q, k] int64), best first, ties to the lower
  // index; metric "ip" (largest first) or "l2" (squared distance, smallest first).
  m.def("knn(Tensor queries, Tensor gallery, int k, str metric, int? chunk_size) -> (Tensor, Tensor)");
}

namespace {

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "kdforge._C: compiled CPU/CUDA kernels, registered as torch.ops.kdforge.* when imported.",
    -1,
    nullptr,
};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
#if defined(KDFORGE_WITH_CUDA)
  const int with_cuda = 1;
#else
  const int with_cuda = 0;
#endif
#if !defined(KDFORGE_CUDA_ARCH_LIST)
#define KDFORGE_CUDA_ARCH_LIST ""
#endif
#if defined(KDFORGE_HAVE_AVX2)
  const char* cpu_builds = "DEFAULT AVX2";
#else
  const char* cpu_builds = "DEFAULT";
#endif
  // Read by kdforge._ext.cuda_available() and `kdforge info`.
  if (PyModule_AddIntConstant(m, "WITH_CUDA", with_cuda) < 0 ||
      PyModule_AddStringConstant(m, "CUDA_ARCH_LIST", KDFORGE_CUDA_ARCH_LIST) < 0 ||
      PyModule_AddStringConstant(m, "CPU_KERNEL_BUILDS", cpu_builds) < 0 ||
      PyModule_AddStringConstant(m, "CPU_KERNEL_ISA", kdforge::cpu_kernel_isa()) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
