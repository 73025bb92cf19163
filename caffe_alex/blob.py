"""pycaffe's Blob: a named array of values (``data``) and gradients (``diff``) seen from Python
as numpy arrays, over torch tensors.

On the CPU ``blob.data`` is the tensor's own memory: writing it changes the values the net
uses, and a forward pass changes what an array obtained earlier shows. On a GPU the values live
on the device; as Caffe's SyncedMemory does, ``blob.data`` copies them to a host array (the same
array each time) and marks it as the newer copy, and the net copies it back before it next
uses the blob: one copy each way per blob read from Python, none for blobs Python never reads.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import numpy as np
import torch
from torch.autograd.graph import increment_version

from .errors import CaffeAlexError

# Caffe's Blob::Reshape limits: a blob's count is an int, and a blob has at most 32 axes.
INT_MAX = 2**31 - 1
MAX_BLOB_AXES = 32


def blob_shape_problem(shape: Sequence) -> str | None:
    """Why Caffe's Blob::Reshape would refuse ``shape`` (None when it would not): a dimension
    that is not an integer, is negative or exceeds INT_MAX, a count above INT_MAX, or more
    than 32 axes. Nothing is allocated: this runs before any tensor of that shape exists."""
    if len(shape) > MAX_BLOB_AXES:
        return f"{len(shape)} axes, more than Caffe's {MAX_BLOB_AXES}"
    total = 1
    for d in shape:
        try:
            d = operator.index(d)
        except TypeError:
            return f"dimension {d} is not an integer"
        if d < 0:
            return f"dimension {d} is negative"
        if d > INT_MAX:
            return f"dimension {d} exceeds INT_MAX ({INT_MAX}), Caffe's limit"
        total *= d
    if total > INT_MAX:
        return f"{total} elements exceed INT_MAX ({INT_MAX}), Caffe's limit for a blob"
    return None


class _Synced:
    """A tensor and, for a device tensor, the host array Python sees.

    ``exposed``: a NumPy view of the (CPU) tensor was handed to Python, which may still hold
    it, so new values are copied into that memory rather than replacing the tensor;
    ``touched``: how many times Python was handed the values (it may have written them), which
    tells the executor whether a layer's record of this blob is still current; ``storage``: the
    memory the tensor is a view of (Blob.reshape keeps it while the count fits, as Caffe).
    ``keep_identity``: the tensor is a Parameter, whose object must stay the same."""

    def __init__(self, tensor: torch.Tensor, keep_identity: bool = False):
        self.tensor = tensor
        self.storage = tensor
        self.host: np.ndarray | None = None
        self.host_newer = False
        self.exposed = False
        self.touched = 0
        self.keep_identity = keep_identity

    def array(self) -> np.ndarray:
        self.touched += 1
        tensor = self.tensor.detach()
        if tensor.device.type == "cpu":
            if not tensor.is_contiguous():  # an array Python writes must not alias elements
                self.tensor = self.storage = tensor = tensor.contiguous()
            self.exposed = True
            if self.keep_identity:  # Python may write the weights: graphs that saved them are old
                increment_version(self.tensor)
            return tensor.numpy()
        if self.host is None or self.host.shape != tuple(tensor.shape):
            self.host = np.empty(tuple(tensor.shape), np.float32)
        if not self.host_newer:
            self.host[...] = tensor.float().cpu().numpy()
        self.host_newer = True  # Python may write it: the device copy is stale from here
        return self.host

    def device_tensor(self) -> torch.Tensor:
        if self.host_newer and self.host is not None:
            values = torch.from_numpy(self.host).to(self.tensor.device, self.tensor.dtype)
            if self.keep_identity:
                with torch.no_grad():
                    self.tensor.copy_(values)
            else:  # new memory: graphs that saved the old values keep them
                self.tensor = self.storage = values
            self.host_newer = False
        return self.tensor

    def take(self, tensor: torch.Tensor) -> None:
        """New values (a layer's output): they become the tensor, or, where Python holds an array
        of the old memory, are copied into it so that the array shows them (Caffe reuses a
        blob's memory)."""
        tensor = tensor.detach()
        old = self.tensor
        if self.exposed and old.shape == tensor.shape and old.dtype == tensor.dtype \
                and old.device == tensor.device:  # fmt: skip
            if old.data_ptr() != tensor.data_ptr() or old.stride() != tensor.stride():
                with torch.no_grad():
                    old.copy_(tensor)
        else:
            self.tensor = self.storage = tensor
            self.exposed = False
        self.host_newer = False

    def move_to(self, device: torch.device) -> None:
        self.tensor = self.storage = self.device_tensor().to(device)
        self.exposed, self.host = False, None

    def reshape(self, shape: tuple[int, ...]) -> None:
        """Caffe's Blob::Reshape: the memory is kept while the new count fits in it (the values
        stay, read in the new shape); a larger count gets new memory, zeros."""
        count = math.prod(shape)
        storage = self.storage.detach().reshape(-1)
        if count > storage.numel():
            storage = self.tensor.new_zeros(count)
            self.storage = storage
            self.exposed = False
        self.tensor = storage[:count].view(shape)
        self.host_newer = False


class Blob:
    """``data``, ``diff`` (numpy arrays), ``shape``, ``count``, ``num``, ``channels``, ``height``,
    ``width`` and ``reshape(*dims)``, as pycaffe's Blob."""

    def __init__(self, data: torch.Tensor, diff: torch.Tensor | None = None):
        self._data = _Synced(data)
        self._diff = _Synced(diff if diff is not None else torch.zeros_like(data))

    # -- what pycaffe code uses ----------------------------------------------------------
    @property
    def data(self) -> np.ndarray:
        return self._data.array()

    @property
    def diff(self) -> np.ndarray:
        return self._diff_slot().array()

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._data.tensor.shape)

    @property
    def count(self) -> int:
        return int(self._data.tensor.numel())

    @property
    def num(self) -> int:
        return self._legacy(0)

    @property
    def channels(self) -> int:
        return self._legacy(1)

    @property
    def height(self) -> int:
        return self._legacy(2)

    @property
    def width(self) -> int:
        return self._legacy(3)

    def reshape(self, *dims) -> None:
        """New dimensions (ints or one sequence). As Caffe's Blob::Reshape: while the count
        fits in the memory the blob has had, data and diff keep their values (read in the new
        shape); a larger count gets new memory, zeros."""
        if len(dims) == 1 and not isinstance(dims[0], (int, np.integer)):
            dims = tuple(dims[0])
        problem = blob_shape_problem(dims)
        if problem:
            raise CaffeAlexError(f"cannot reshape a blob to {list(dims)}: {problem}")
        shape = tuple(int(d) for d in dims)
        if shape == self.shape:
            return
        self._reshape(shape)

    def __repr__(self) -> str:
        return f"Blob(shape={list(self.shape)})"

    # -- for the net that owns the blob --------------------------------------------------
    @property
    def exposed(self) -> bool:
        """Whether Python may hold an array over the data's memory (CPU)."""
        return self._data.exposed

    def data_tensor(self) -> torch.Tensor:
        """The values as the net uses them (Python's writes copied in first)."""
        return self._data.device_tensor()

    def diff_tensor(self) -> torch.Tensor:
        return self._diff_slot().device_tensor()

    def stamp(self) -> tuple[torch.Tensor, int, int]:
        """(tensor, its version, times handed to Python): equal stamps mean equal values."""
        tensor = self._data.device_tensor()
        return tensor, tensor._version, self._data.touched

    def set_data(self, tensor: torch.Tensor) -> None:
        """New values (a layer's output), in the same memory where Python holds an array."""
        self._data.take(tensor)
        if self._diff.tensor.shape != tensor.shape:
            self._diff = _Synced(torch.zeros_like(tensor.detach()))

    put = set_data

    def set_diff(self, tensor: torch.Tensor) -> None:
        self._diff_slot().take(tensor)

    def move_to(self, device: torch.device) -> None:
        self._data.move_to(device)
        self._diff_slot().move_to(device)

    def _diff_slot(self) -> _Synced:
        return self._diff

    def _reshape(self, shape: tuple[int, ...]) -> None:
        self._data.reshape(shape)
        self._diff.reshape(shape)

    def _legacy(self, index: int) -> int:
        # Blob::LegacyShape: a missing axis counts as 1; more than 4 axes has no legacy view
        shape = self.shape
        if len(shape) > 4:
            raise CaffeAlexError(
                f"num/channels/height/width need a blob of at most 4 axes, got {list(shape)}"
            )
        return shape[index] if index < len(shape) else 1


class ParamBlob(Blob):
    """A learnable blob: ``data`` is the parameter itself, ``diff`` its ``.grad`` (zeros once
    read while there is none, so Python can write it). ``param`` is a function giving the
    parameter, looked up at each use (the builder may replace it by a shared one)."""

    def __init__(self, param):
        self._param = param if callable(param) else (lambda: param)
        self._slots: dict[str, _Synced] = {}

    @property
    def param(self) -> torch.nn.Parameter:
        return self._param()

    @property
    def _data(self) -> _Synced:  # type: ignore[override]
        return self._slot("data", self.param)

    def _diff_slot(self) -> _Synced:
        param = self.param
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        return self._slot("diff", param.grad)

    def _slot(self, kind: str, tensor: torch.Tensor) -> _Synced:
        slot = self._slots.get(kind)
        if slot is None or slot.tensor is not tensor:
            slot = self._slots[kind] = _Synced(tensor, keep_identity=True)
        return slot

    def sync(self) -> None:
        """Copy Python's writes (values and gradient) to the device now."""
        for slot in self._slots.values():
            slot.device_tensor()

    def set_diff(self, tensor: torch.Tensor) -> None:
        with torch.no_grad():
            self._diff_slot().tensor.copy_(tensor)

    def _reshape(self, shape: tuple[int, ...]) -> None:
        # a parameter keeps its object (the module and the solver hold it): new values in it
        param = self.param
        old = param.detach().reshape(-1)
        values = old.new_zeros(math.prod(shape))
        if values.numel() <= old.numel():
            values = old[: values.numel()].clone()
        with torch.no_grad():
            param.data = values.view(shape)
        param.grad = torch.zeros_like(param)
        self._slots.clear()


class BlobVec(list):
    """pycaffe's BlobVec: a list of Blobs with ``add_blob(*shape)`` (a Python layer's
    learnable blobs; the layer hosting it registers each as a parameter)."""

    def __init__(self, on_add=None):
        super().__init__()
        self._on_add = on_add

    def add_blob(self, *dims) -> None:
        if len(dims) == 1 and not isinstance(dims[0], (int, np.integer)):
            dims = tuple(dims[0])
        problem = blob_shape_problem(dims)
        if problem:
            raise CaffeAlexError(f"cannot add a blob of shape {list(dims)}: {problem}")
        tensor = torch.zeros(tuple(int(d) for d in dims))
        if self._on_add is not None:  # the owner keeps the parameter and says how to find it
            self.append(ParamBlob(self._on_add(tensor)))
        else:
            self.append(ParamBlob(torch.nn.Parameter(tensor)))
