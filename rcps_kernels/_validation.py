"""Input checks shared by the public functions: ValueErrors that name the argument and shapes."""
from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


def plain_tensors(*inputs: object) -> tuple:
    """The inputs, with every tensor subclass (MONAI's ``MetaTensor``, ``nn.Parameter``, ...) replaced by a
    plain ``torch.Tensor`` view of it: same memory, still in the autograd graph, so gradients reach the
    original. Metadata such as an affine means nothing to a loss, and a subclass's ``__torch_function__``
    would otherwise run on every op and stop ``torch.compile(fullgraph=True)``. The view is taken with
    subclass dispatch disabled (``Tensor.as_subclass`` does not trace under torch.compile). Non-tensors
    pass through for the checks to report.
    """
    return tuple(_plain(x) if isinstance(x, torch.Tensor) and type(x) is not torch.Tensor else x
                 for x in inputs)


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    with torch._C.DisableTorchFunctionSubclass():
        return tensor.view_as(tensor)


def check_volume(name: str, tensor: object) -> torch.Tensor:
    """A floating (B, C, *S) tensor with 1-3 spatial dims and no empty axis."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not 3 <= tensor.dim() <= 5:
        raise ValueError(
            f"{name} must be (B, C, *spatial) with 1-3 spatial dims, got shape {tuple(tensor.shape)}"
        )
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating tensor, got dtype {tensor.dtype}")
    if tensor.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(tensor.shape)}")
    return tensor


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all inputs must be on one device, got {listed}")
    return first


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def shape_str(tensor: torch.Tensor) -> str:
    return str(tuple(tensor.shape))


def all_finite(inputs_sum: torch.Tensor, tensors: tuple[torch.Tensor, ...]) -> bool:
    """Whether a 0-d sum of some inputs and every element of ``tensors`` are finite (one host
    sync; a norm that overflows on finite values answers False, which only costs the exact
    check). Under torch.compile nothing is checked and the answer is True."""
    if torch.compiler.is_compiling():
        return True
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms = torch._foreach_norm([t.detach() for t in tensors], 2, dtype=dtype)  # one launch
    return math.isfinite(torch.stack([inputs_sum.to(dtype), *norms]).sum().item())


def check_result_finite(loss: torch.Tensor, checks: tuple[tuple[str, torch.Tensor, bool], ...],
                        inputs_sum: torch.Tensor | None = None) -> None:
    """Non-finite inputs always make the loss non-finite, so only a bad loss costs a full scan.

    ``checks`` holds (name, tensor, allow_minus_inf): a teacher may rule classes out with -inf
    logits, as long as every voxel keeps one finite logit. ``inputs_sum`` is a 0-d float32 sum
    of inputs that can hold a NaN which never reaches the loss (unselected logits): it joins
    the same test, so the whole check costs one host sync (a sum that overflows on finite
    values only costs the exact scan of ``checks``, which decides).
    """
    if torch.compiler.is_compiling():
        return
    total = loss.detach()
    if total.dim() != 0:
        total = total.sum()
    if inputs_sum is not None:
        total = total + inputs_sum
    if math.isfinite(total.item()):
        return
    for name, tensor, allow_minus_inf in checks:
        shape = tuple(tensor.shape)
        if allow_minus_inf:
            if bool(torch.isnan(tensor).any()) or bool(torch.isposinf(tensor).any()):
                raise ValueError(f"{name} contains NaN or +Inf (shape {shape})")
            if bool(torch.isneginf(tensor).all(dim=1).any()):
                raise ValueError(f"{name} has a voxel whose logits are all -inf (shape {shape})")
        elif not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{name} contains NaN or Inf (shape {shape})")
