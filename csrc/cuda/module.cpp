// Python module entry point of the CUDA extension. Each .cu file registers its ops with
// TORCH_LIBRARY_FRAGMENT(rcps_cuda, ...); they are called through torch.ops.rcps_cuda.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rcps_kernels CUDA kernels (ops are under torch.ops.rcps_cuda)";
}
