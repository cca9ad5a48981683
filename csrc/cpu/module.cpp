// Python module entry point of the CPU extension. The ops themselves are registered by each
// source file with TORCH_LIBRARY_FRAGMENT(rcps_C, ...) and called through torch.ops.rcps_C.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rcps_kernels CPU kernels (ops are under torch.ops.rcps_C)";
}
