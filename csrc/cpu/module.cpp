// Python module entry point of the CPU extension. The ops themselves are registered by each
// source file (cpu/ and common/) with TORCH_LIBRARY_FRAGMENT(rcps_cpu, ...) and called through
// torch.ops.rcps_cpu.<op> (voxel_infonce, random_draws, rectified_pseudo_supervision_forward, ...,
// negative_tables).
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rcps_kernels CPU kernels (ops are under torch.ops.rcps_cpu)";
}
