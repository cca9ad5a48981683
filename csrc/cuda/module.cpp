// Python module entry point of the CUDA extension. Each .cu file registers its ops with
// TORCH_LIBRARY_FRAGMENT(rcps_cuda, ...); they are called through torch.ops.rcps_cuda.<op>
// (voxel_infonce, random_draws, rectified_pseudo_supervision_forward, ...: the same op names as
// torch.ops.rcps_cpu).
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rcps_kernels CUDA kernels (ops are under torch.ops.rcps_cuda)";
}
