"""Every input check of the public API: errors that name the argument and shapes.

A wrong type (a bool, string or None where a number is expected) raises TypeError; a value of
the right type outside its range raises ValueError. Also here: the one dtype rule of the losses
(:func:`accumulation_dtype`), the unwrapping of tensor subclasses (:func:`plain_tensors`) and
the deprecated keyword names (:func:`renamed_keywords`).
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")
SAMPLING_MODES = ("topk", "random")
#: Smallest InfoNCE temperature served (2**-125, about 2.35e-38): a per-anchor loss reaches
#: 4 / temperature, which overflows float32 below it. Every backend is exact down to it.
MIN_TEMPERATURE = 2.0**-125


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the kernels accumulate in and return losses in: float64 for float64 inputs, float32
    for every other floating dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def plain_tensors(*inputs: object) -> tuple:
    """The inputs, with every tensor subclass (MONAI's ``MetaTensor``, ``nn.Parameter``, ...) replaced by a
    plain ``torch.Tensor`` view of it: same memory, still in the autograd graph, so gradients reach the
    original. Metadata such as an affine means nothing to a loss, and a subclass's ``__torch_function__``
    would otherwise run on every op and stop ``torch.compile(fullgraph=True)``. The view is taken with
    subclass dispatch disabled (``Tensor.as_subclass`` does not trace under torch.compile). Non-tensors
    pass through for the checks to report.
    """
    return tuple(_plain(x) if isinstance(x, torch.Tensor) and type(x) is not torch.Tensor else x for x in inputs)


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    with torch._C.DisableTorchFunctionSubclass():
        return tensor.view_as(tensor)


def check_volume(name: str, tensor: object) -> torch.Tensor:
    """A floating (B, C, *S) tensor with 1-3 spatial dims and no empty axis."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not 3 <= tensor.dim() <= 5:
        raise ValueError(f"{name} must be (B, C, *spatial) with 1-3 spatial dims, got shape {tuple(tensor.shape)}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating tensor, got dtype {tensor.dtype}")
    if tensor.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(tensor.shape)}")
    return tensor


def check_logits(name: str, logits: object) -> torch.Tensor:
    """Floating (B, num_classes, *S) logits with 1-3 spatial dims, num_classes >= 2 and no empty axis."""
    check_volume(name, logits)
    if logits.shape[1] < 2:
        raise ValueError(f"{name} needs at least 2 classes on axis 1, got shape {shape_str(logits)}")
    return logits


def check_logits_pair(first_name: str, first: object, second_name: str, second: object) -> None:
    """Two logits tensors of one shape, dtype and device."""
    check_logits(first_name, first)
    check_logits(second_name, second)
    if first.shape != second.shape:
        raise ValueError(
            f"{first_name} and {second_name} must have the same shape, got {shape_str(first)} and {shape_str(second)}"
        )
    if first.dtype != second.dtype:
        raise ValueError(
            f"{first_name} and {second_name} must have the same dtype, got "
            f"{first.dtype} and {second.dtype} (shape {shape_str(first)})"
        )
    if first.device != second.device:
        raise ValueError(
            f"{first_name} (shape {shape_str(first)}) is on {first.device} but "
            f"{second_name} (shape {shape_str(second)}) is on {second.device}"
        )


def check_count(name: str, value: object, minimum: int = 1) -> int:
    """An int >= minimum (a bool is not a count, though Python makes it an int)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def check_positive_real(name: str, value: object) -> float:
    """A finite real number > 0 (an int or float; not a bool, string, None or tensor)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be > 0 and finite, got {value!r}")
    return float(value)


def check_reciprocal_range(name: str, value: float, dtype: torch.dtype) -> None:
    """The kernels multiply by 1/value in the accumulation dtype of `dtype` inputs (float32 for
    half and float32, float64 for float64): it must be a finite normal number there."""
    info = torch.finfo(accumulation_dtype(dtype))
    low, high = 1.0 / info.max, 1.0 / info.tiny
    if not low <= value <= high:
        raise ValueError(
            f"{name}={value!r} is out of range for {dtype} inputs: 1/{name} must be a finite "
            f"normal {info.dtype} number, so {name} must lie in [{low:.4g}, {high:.4g}]"
        )


def check_loss_options(reduction: str, dtype: torch.dtype | None = None, **reciprocals: object) -> None:
    """reduction, and the numbers whose reciprocal the kernels use (temperature, eps): finite
    and > 0, with a reciprocal that is a finite normal number for `dtype` inputs (when known)."""
    check_reduction(reduction)
    for name, value in reciprocals.items():
        check_positive_real(name, value)
        if dtype is not None:
            check_reciprocal_range(name, value, dtype)


def check_optional_bool(name: str, value: object) -> None:
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{name} must be True, False or None, got {type(value).__name__} {value!r}")


def check_generator(generator: object) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__} {generator!r}")


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Every element finite (one host sync; nothing to check on meta tensors or while
    torch.compile traces)."""
    if has_no_data(tensor):
        return
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} contains NaN or Inf (shape {shape_str(tensor)})")


def refuse_double_backward(op: str) -> None:
    """Raise when a fused op's backward runs under ``create_graph=True`` (autograd enables grad mode in backward
    then). Its gradient kernels are not themselves differentiable: answering with a gradient that has no graph
    would silently drop every second-order term (a gradient penalty, a Hessian-vector product)."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(
            f"rcps_kernels.{op}: double backward (create_graph=True) is not supported by the fused backends; "
            "use backend='reference' for second-order gradients"
        )


def has_no_data(tensor: torch.Tensor) -> bool:
    """Meta tensors (shapes only) and tensors traced by torch.compile hold no values to check."""
    return tensor.device.type == "meta" or torch.compiler.is_compiling()


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
    check). Under torch.compile and on meta tensors nothing is checked and the answer is True."""
    if has_no_data(tensors[0]):
        return True
    dtype = accumulation_dtype(tensors[0].dtype)
    norms = torch._foreach_norm([t.detach() for t in tensors], 2, dtype=dtype)  # one launch
    return math.isfinite(torch.stack([inputs_sum.to(dtype), *norms]).sum().item())


def check_result_finite(
    loss: torch.Tensor,
    checks: tuple[tuple[str, torch.Tensor, bool], ...],
    inputs_sum: torch.Tensor | None = None,
    remedy: str = "rescale the inputs, or pass float64 tensors",
) -> None:
    """Non-finite inputs always make the loss non-finite, so only a bad loss costs a full scan.

    ``checks`` holds (name, tensor, allow_minus_inf): a teacher may rule classes out with -inf
    logits, as long as every voxel keeps one finite logit. ``inputs_sum`` is a 0-d float32 sum
    of inputs that can hold a NaN which never reaches the loss (unselected logits): it joins
    the same test, so the whole check costs one host sync (a sum that overflows on finite
    values only costs the exact scan of ``checks``, which decides).

    Raises:
        ValueError: naming the first input that holds a NaN/Inf; or, when they are all finite
            and the loss is not, naming them with their largest magnitude and ``remedy`` (a value
            overflowed the loss dtype: the loss is refused rather than returned as NaN/Inf).
    """
    if has_no_data(loss):
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
    if not bool(torch.isfinite(loss.detach()).all()):
        largest = ", ".join(f"{name} {_largest_finite(tensor):.4g}" for name, tensor, _ in checks)
        raise ValueError(
            f"the loss overflowed {loss.dtype} although every input is finite (largest |value|: {largest}): {remedy}"
        )


def _largest_finite(tensor: torch.Tensor) -> float:
    finite = tensor.detach()[torch.isfinite(tensor.detach())]
    return finite.abs().max().item() if finite.numel() else 0.0


def check_class_count(logits: torch.Tensor, num_classes: object, name: str) -> int:
    """num_classes (default: the logits' class axis), at least that axis."""
    classes = logits.shape[1]
    if num_classes is None:
        return classes
    check_count("num_classes", num_classes)
    if num_classes < classes:
        raise ValueError(f"num_classes={num_classes} is smaller than {name}'s class axis ({classes})")
    return int(num_classes)


def check_pool_logits(logits: object, num_classes: object = None, name: str = "pool_logits") -> int:
    """Floating, finite (Bn, num_classes, *S) pool logits (pseudo-labels of NaN logits would be
    arbitrary). Returns the number of classes."""
    check_volume(name, logits)
    check_finite(name, logits)
    return check_class_count(logits, num_classes, name)


def check_infonce_inputs(anchor, positive, pool, anchor_logits, pool_logits) -> None:
    """The five tensors of the voxel InfoNCE: shapes, dtypes and devices that fit together."""
    for name, t in (
        ("anchor", anchor),
        ("positive", positive),
        ("pool", pool),
        ("anchor_logits", anchor_logits),
        ("pool_logits", pool_logits),
    ):
        check_volume(name, t)
    check_same_device(anchor=anchor, positive=positive, pool=pool, anchor_logits=anchor_logits, pool_logits=pool_logits)
    if positive.shape != anchor.shape:
        raise ValueError(f"positive must have anchor's shape {shape_str(anchor)}, got {shape_str(positive)}")
    if positive.dtype != anchor.dtype or pool.dtype != anchor.dtype:
        raise ValueError(
            f"anchor, positive and pool must share a dtype, got {anchor.dtype}, {positive.dtype} and {pool.dtype}"
        )
    if pool.dim() != anchor.dim() or pool.shape[1] != anchor.shape[1]:
        raise ValueError(
            f"pool must be (Bn, C, *S) with anchor's C={anchor.shape[1]} and "
            f"{anchor.dim() - 2} spatial dims, got {shape_str(pool)}"
        )
    if anchor_logits.shape[0] != anchor.shape[0] or anchor_logits.shape[2:] != anchor.shape[2:]:
        raise ValueError(
            f"anchor_logits must be (B, num_classes, *S) matching anchor "
            f"{shape_str(anchor)}, got {shape_str(anchor_logits)}"
        )
    if pool_logits.shape[0] != pool.shape[0] or pool_logits.shape[2:] != pool.shape[2:]:
        raise ValueError(
            f"pool_logits must be (Bn, num_classes, *S) matching pool {shape_str(pool)}, got {shape_str(pool_logits)}"
        )
    if pool_logits.shape[1] != anchor_logits.shape[1]:
        raise ValueError(
            f"anchor_logits and pool_logits must have the same number of classes, "
            f"got {shape_str(anchor_logits)} and {shape_str(pool_logits)}"
        )
    if anchor_logits.shape[1] < 2:
        raise ValueError(f"anchor_logits needs at least 2 classes, got {shape_str(anchor_logits)}")


def check_infonce_options(
    num_negatives, temperature, sampling, confidence_threshold, generator, reduction, deterministic
) -> None:
    """The keywords of the voxel InfoNCE."""
    check_count("num_negatives", num_negatives)
    check_positive_real("temperature", temperature)
    if temperature < MIN_TEMPERATURE:
        raise ValueError(
            f"temperature must be >= {MIN_TEMPERATURE:.4g} (2**-125), got "
            f"{temperature!r}: the loss reaches 4 / temperature, beyond float32"
        )
    if sampling not in SAMPLING_MODES:
        raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
    if not 0.0 <= confidence_threshold <= 1.0:
        raise ValueError(f"confidence_threshold must be in [0, 1], got {confidence_threshold!r}")
    check_generator(generator)
    check_reduction(reduction)
    check_optional_bool("deterministic", deterministic)


def renamed_keywords(**renames: str):
    """Accept the old keyword names of a function, with a DeprecationWarning, for one release.

    ``@renamed_keywords(negative="pool")`` lets ``f(negative=x)`` call ``f(pool=x)``.
    """

    def decorate(function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(
                            f"{function.__qualname__}() got both {old}= and its new name {new}=; pass only {new}="
                        )
                    warnings.warn(
                        f"{function.__qualname__}(): the keyword {old}= is deprecated, use {new}=",
                        DeprecationWarning,
                        stacklevel=2,
                    )
                    kwargs[new] = kwargs.pop(old)
            return function(*args, **kwargs)

        return wrapper

    return decorate
