"""Caffe's weight fillers (include/caffe/filler.hpp), applied when a layer creates its blobs.

Fan sizes follow Caffe, not PyTorch: fan_in = count / shape[0], fan_out = count / shape[1]
(for a 1-D blob, the count). For InnerProduct (N x K) that makes fan_in = K as expected;
for a Deconvolution weight (C_in x C_out x kh x kw) Caffe's "fan_in" is really fan_out, and we
keep that, because weights trained with Caffe were initialised that way.

Before anything is allocated, a shape is held to Caffe's Blob::Reshape limits
(``blob_shape_problem``: no negative dimension, at most INT_MAX elements, at most 32 axes); the
builder holds every inferred top shape to the same limits.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch

from .blob import INT_MAX, MAX_BLOB_AXES, blob_shape_problem  # noqa: F401  (re-exported)
from .errors import LayerConfigError


def check_blob_shape(shape: Sequence, what: str) -> tuple[int, ...]:
    """``shape`` as a tuple of ints, or LayerConfigError naming ``what`` (e.g. "learnable blob
    0") and the shape when Caffe's Blob::Reshape would refuse it."""
    problem = blob_shape_problem(shape)
    if problem is not None:
        raise LayerConfigError(f"{what} would have shape {list(shape)}: {problem}")
    return tuple(operator.index(d) for d in shape)


def fill(
    shape: Sequence[int],
    filler=None,
    generator: torch.Generator | None = None,
    what: str = "blob",
) -> torch.Tensor:
    """A new float32 tensor of ``shape`` filled as ``filler`` (a FillerParameter) says.

    ``filler`` None means Caffe's default FillerParameter: constant 0. A shape Caffe's blobs
    cannot have is refused before anything is allocated (``what`` names the blob then).
    """
    shape = check_blob_shape(shape, what)
    kind = filler.type if filler is not None else "constant"
    if kind not in FILLER_TYPES:
        raise LayerConfigError(f"unknown filler type '{kind}'; known: {', '.join(FILLER_TYPES)}")
    sparse = filler.sparse if filler is not None else -1
    if sparse != -1 and kind != "gaussian":
        raise LayerConfigError(f"filler '{kind}' does not support sparse (only gaussian does)")
    out = torch.empty(shape, dtype=torch.float32)
    if out.numel() == 0:
        return out
    return _FILLERS[kind](out, filler, generator)


# One function per filler type: (the empty tensor, the FillerParameter, the generator) -> the
# tensor filled in place. Only "constant" is given a None filler (Caffe's default).


def _constant(out: torch.Tensor, filler, generator) -> torch.Tensor:
    return out.fill_(filler.value if filler is not None else 0.0)


def _uniform(out: torch.Tensor, filler, generator) -> torch.Tensor:
    # Caffe's caffe_rng_uniform CHECKs min <= max; torch also needs finite bounds
    if not (math.isfinite(filler.min) and math.isfinite(filler.max)) or filler.min > filler.max:
        raise LayerConfigError(
            f"uniform filler needs finite min <= max, got min {filler.min}, max {filler.max}"
        )
    return out.uniform_(filler.min, filler.max, generator=generator)


def _gaussian(out: torch.Tensor, filler, generator) -> torch.Tensor:
    # Caffe's caffe_rng_gaussian CHECKs std > 0 (a std of 0 stops Caffe too)
    if not (filler.std > 0 and math.isfinite(filler.std) and math.isfinite(filler.mean)):
        raise LayerConfigError(
            f"gaussian filler needs a finite std > 0 and a finite mean, got std "
            f"{filler.std}, mean {filler.mean}"
        )
    out.normal_(filler.mean, filler.std, generator=generator)
    if filler.sparse >= 0:
        _sparsify(out, filler.sparse, generator)
    return out


def _xavier(out: torch.Tensor, filler, generator) -> torch.Tensor:
    scale = math.sqrt(3.0 / _variance_norm_count(tuple(out.shape), filler))
    return out.uniform_(-scale, scale, generator=generator)


def _msra(out: torch.Tensor, filler, generator) -> torch.Tensor:
    n = _variance_norm_count(tuple(out.shape), filler)
    return out.normal_(0.0, math.sqrt(2.0 / n), generator=generator)


def _variance_norm_count(shape: tuple[int, ...], filler) -> float:
    total = math.prod(shape)
    fan_in = total // shape[0]
    fan_out = total // shape[1] if len(shape) > 1 else total
    norm = filler.VarianceNorm.Name(filler.variance_norm)
    if norm == "FAN_OUT":
        return float(fan_out)
    if norm == "AVERAGE":
        return (fan_in + fan_out) / 2.0
    return float(fan_in)


def _sparsify(out: torch.Tensor, sparse: int, generator) -> None:
    # Each weight survives with probability sparse / num_outputs, so every output unit keeps
    # about `sparse` non-zero inputs on average (Caffe's GaussianFiller).
    if out.dim() < 1:
        raise LayerConfigError("sparse gaussian filler needs a blob with at least one axis")
    keep_probability = sparse / out.shape[0]
    mask = torch.rand(out.shape, generator=generator) < keep_probability
    out.mul_(mask)


def _positive_unitball(out: torch.Tensor, filler, generator) -> torch.Tensor:
    # Uniform in [0, 1), then each row (first axis) scaled to sum to one.
    out.uniform_(0.0, 1.0, generator=generator)
    rows = out.reshape(out.shape[0], -1)
    rows.div_(rows.sum(dim=1, keepdim=True))
    return out


def _bilinear(out: torch.Tensor, filler, generator) -> torch.Tensor:
    # The upsampling kernel for a Deconvolution initialised to bilinear interpolation.
    if out.dim() != 4 or out.shape[2] != out.shape[3]:
        raise LayerConfigError(
            f"bilinear filler needs a 4-D blob with square kernels, got {list(out.shape)}"
        )
    size = out.shape[3]
    f = math.ceil(size / 2.0)
    c = (size - 1) / (2.0 * f)
    coords = torch.arange(size, dtype=torch.float64)
    profile = 1 - torch.abs(coords / f - c)
    kernel = (profile[:, None] * profile[None, :]).to(torch.float32)
    out.copy_(kernel.expand_as(out))
    return out


# in the order of Caffe's GetFiller, which the unknown-type error lists
_FILLERS = {
    "constant": _constant,
    "uniform": _uniform,
    "gaussian": _gaussian,
    "positive_unitball": _positive_unitball,
    "xavier": _xavier,
    "msra": _msra,
    "bilinear": _bilinear,
}
FILLER_TYPES = tuple(_FILLERS)
