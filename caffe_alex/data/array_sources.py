"""Sources of ready arrays: HDF5Data (datasets in .h5 files) and MemoryData (arrays from Python).

Neither transforms: Caffe's HDF5Data refuses transform_param, and its MemoryData copies arrays
given through ``set_input_arrays`` (its Reset) unchanged.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .sources import Source, _check_source_path


class HDF5Source(Source):
    """hdf5_data_param: source (a text file naming .h5 files, whitespace separated), shuffle.

    Each top reads the dataset of its name, as float32. Files are read whole, as Caffe does.
    With shuffle, the file order is permuted each pass and the rows within each file each time
    it comes round (Caffe's file_permutation_ and data_permutation_)."""

    def __init__(self, lp, phase, seed):
        super().__init__(lp, phase, seed)
        p = lp.hdf5_data_param
        _check_source_path(self, p.source)
        with open(p.source) as f:
            self.files = f.read().split()
        if not self.files:
            raise self.fail(f"no HDF5 file is listed in '{p.source}'")
        self.tops, self.shuffle = list(lp.top), bool(p.shuffle)
        self.sizes = np.array([self._rows(path) for path in self.files], dtype=np.int64)
        self.total = int(self.sizes.sum())
        if self.total == 0:
            raise self.fail(f"the HDF5 files listed in '{p.source}' hold no row")
        self._load = lru_cache(maxsize=2)(self._read)

    def __len__(self):
        return self.total

    def _rows(self, path: str) -> int:
        import h5py  # imported on use: a heavy import most feeds never need

        _check_source_path(self, path)
        with h5py.File(path, "r") as h5:
            missing = [t for t in self.tops if t not in h5]
            if missing:
                raise self.fail(f"HDF5 file '{path}' has no dataset '{missing[0]}'")
            rows = {t: h5[t].shape[0] if h5[t].ndim else 0 for t in self.tops}
        if len(set(rows.values())) != 1:
            raise self.fail(f"datasets in '{path}' differ in their first dimension: {rows}")
        return next(iter(rows.values()))

    def _read(self, file_index: int) -> list[np.ndarray]:
        import h5py  # imported on use: a heavy import most feeds never need

        with h5py.File(self.files[file_index], "r") as h5:
            return [np.asarray(h5[t], dtype=np.float32) for t in self.tops]

    def locate(self, position: int) -> tuple[int, int]:
        """(file index, row) of a stream position."""
        epoch, offset = divmod(position, self.total)
        order = np.arange(len(self.files))
        if self.shuffle:
            order = np.random.default_rng((self.seed, 3, epoch)).permutation(order)
        ends = np.cumsum(self.sizes[order])
        slot = int(np.searchsorted(ends, offset, side="right"))
        file_index = int(order[slot])
        row = offset - int(ends[slot] - self.sizes[file_index])
        if self.shuffle:
            rows = np.random.default_rng((self.seed, 4, epoch, file_index))
            row = int(rows.permutation(int(self.sizes[file_index]))[row])
        return file_index, row

    def where(self, position: int) -> str:
        file_index, row = self.locate(position)
        return f"row {row} of '{self.files[file_index]}'"

    def sample(self, position: int, rng) -> list[np.ndarray]:
        file_index, row = self.locate(position)
        return [array[row] for array in self._load(file_index)]


class MemorySource(Source):
    """MemoryData: the arrays last given with ``set_input_arrays``, served in order and from
    the start again after each new call (Caffe's Reset sets its position to 0)."""

    in_process = True

    def __init__(self, lp, phase, seed, layer):
        super().__init__(lp, phase, seed)
        self.layer = layer
        self._seen, self._base = None, 0

    def __len__(self):
        arrays = self._arrays()
        return len(arrays[0])

    def _arrays(self):
        arrays = getattr(self.layer, "input_arrays", None)
        if arrays is None:
            raise self.fail("no arrays to read: call net.set_input_arrays(data, labels) first")
        return arrays

    def where(self, position: int) -> str:
        return f"row {(position - self._base) % len(self)} of the input arrays"

    def sample(self, position: int, rng) -> list[np.ndarray]:
        arrays = self._arrays()
        if arrays is not self._seen:
            self._seen, self._base = arrays, position
        row = (position - self._base) % len(arrays[0])
        return [arrays[0][row], arrays[1][row]]
