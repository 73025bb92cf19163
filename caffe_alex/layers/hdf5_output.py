"""HDF5Output: writes its two bottoms to an HDF5 file (no tops, no gradient).

``hdf5_output_param``: file_name. As Caffe's layer: exactly two bottoms, stored as the datasets
"data" (bottom 0) and "label" (bottom 1) whatever the bottoms are called, float32, in Caffe's
legacy 4-D shape (num, channels, height, width) -- a (N, K) blob is written as (N, K, 1, 1) --
and the file is replaced, not added to. Caffe creates (truncates) the file when the net is
built, writes the datasets in place at the first forward, and aborts on the second because they
already exist. Three differences, all deliberate: the file is created at the first forward
(building a net for `time` or `draw` should not clobber files); each later forward adds its
rows along axis 0; and every forward is atomic, as all of caffe-alex's writes are: the file so
far is copied beside the final name (a kernel-side copy), the rows are added there, and the
copy is renamed over the file. A run killed mid-write thus leaves the file of the batches
before it, never a broken one; the price is one copy of the file per forward.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import torch

from ..errors import CaffeAlexError, LayerConfigError
from ..formats.atomic import atomic_path
from ..registry import CaffeLayer, register

_NAMES = ("data", "label")  # Caffe's HDF5_DATA_DATASET_NAME and HDF5_DATA_LABEL_NAME


def legacy_shape(shape) -> tuple[int, ...]:
    """Caffe's Blob::LegacyShape view (num, channels, height, width): missing axes are 1."""
    if len(shape) > 4:
        raise LayerConfigError(f"cannot write a {len(shape)}-D blob {tuple(shape)}: at most 4 axes")
    return tuple(shape) + (1,) * (4 - len(shape))


@register("HDF5Output")
class HDF5OutputLayer(CaffeLayer):
    bottoms = (2, 2)
    tops = (0, 0)
    params = {"hdf5_output_param": frozenset({"file_name"})}

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        self.file_name = layer_param.hdf5_output_param.file_name
        if not self.file_name:
            raise LayerConfigError("hdf5_output_param.file_name is required")
        self._written = False

    def top_shapes(self, bottom_shapes):
        data, label = bottom_shapes
        legacy_shape(data), legacy_shape(label)
        if data[0] != label[0]:
            raise LayerConfigError(
                f"data and label must have the same batch size ({data[0]} vs {label[0]})"
            )
        return []

    def forward(self, data: torch.Tensor, label: torch.Tensor):
        import h5py  # imported on use: a heavy import most nets never need

        arrays = [b.detach().float().cpu().numpy() for b in (data, label)]
        try:
            with atomic_path(self.file_name) as tmp:
                earlier = self._written and os.path.exists(self.file_name)
                if earlier:  # this net's rows so far: the new ones go after them
                    shutil.copyfile(self.file_name, tmp)
                with h5py.File(tmp, "a" if earlier else "w") as h5:
                    for name, array in zip(_NAMES, arrays):
                        _append(h5, name, array.reshape(legacy_shape(array.shape)))
        except (CaffeAlexError, ValueError) as exc:  # a failed write; rows of another shape
            message = exc.message if isinstance(exc, CaffeAlexError) else str(exc)
            raise CaffeAlexError(message, layer=self.name, layer_type="HDF5Output") from None
        self._written = True
        return ()


def _append(h5, name: str, array: np.ndarray) -> None:
    if name not in h5:
        h5.create_dataset(name, data=array, maxshape=(None, *array.shape[1:]), chunks=True)
        return
    dataset = h5[name]
    if dataset.shape[1:] != array.shape[1:]:
        raise ValueError(
            f"'{name}' rows of shape {array.shape[1:]} cannot follow the earlier "
            f"{dataset.shape[1:]} in the HDF5 file"
        )
    start = dataset.shape[0]
    dataset.resize(start + array.shape[0], axis=0)
    dataset[start:] = array
