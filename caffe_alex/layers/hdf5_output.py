"""HDF5Output: writes its two bottoms to an HDF5 file (no tops, no gradient).

``hdf5_output_param``: file_name. As Caffe's layer: exactly two bottoms, stored as the datasets
"data" (bottom 0) and "label" (bottom 1) whatever the bottoms are called, float32, in Caffe's
legacy 4-D shape (num, channels, height, width) -- a (N, K) blob is written as (N, K, 1, 1) --
and the file is replaced, not added to. Two differences, both deliberate: the file is created at
the first forward rather than when the net is built (building a net for `time` or `draw`
should not clobber files), and each later forward appends its rows along axis 0, where Caffe's
layer aborts on the second forward because the datasets already exist.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import LayerConfigError, describe
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
        mode = "a" if self._written else "w"
        try:
            with h5py.File(self.file_name, mode) as h5:
                for name, array in zip(_NAMES, arrays):
                    _append(h5, name, array.reshape(legacy_shape(array.shape)))
        except OSError as exc:
            raise OSError(f"cannot write HDF5 file '{self.file_name}': {describe(exc)}") from None
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
