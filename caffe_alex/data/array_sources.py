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
        self._order = lru_cache(maxsize=4)(self._epoch_order)  # a few epochs' orders
        self._row_order = lru_cache(maxsize=4)(self._file_row_order)

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
        files, rows = self.locate_many(np.array([position], dtype=np.int64))
        return int(files[0]), int(rows[0])

    def locate_many(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(file indices, rows) of an array of stream positions."""
        if len(self.files) == 1 and not self.shuffle:  # the common case, in one operation
            return np.zeros_like(positions), positions % self.total
        epochs, offsets = np.divmod(positions, self.total)
        files = np.empty_like(positions)
        rows = np.empty_like(positions)
        for epoch in np.unique(epochs):
            here = epochs == epoch
            order, ends = self._order(int(epoch))
            slots = np.searchsorted(ends, offsets[here], side="right")
            files[here] = order[slots]
            rows[here] = offsets[here] - (ends[slots] - self.sizes[order[slots]])
            if self.shuffle:
                for file_index in np.unique(files[here]):
                    pick = here & (files == file_index)
                    rows[pick] = self._row_order(int(epoch), int(file_index))[rows[pick]]
        return files, rows

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The file order of an epoch and the stream offset where each of its files ends."""
        order = np.arange(len(self.files))
        if self.shuffle:
            order = np.random.default_rng((self.seed, 3, epoch)).permutation(order)
        return order, np.cumsum(self.sizes[order])

    def _file_row_order(self, epoch: int, file_index: int) -> np.ndarray:
        rows = np.random.default_rng((self.seed, 4, epoch, file_index))
        return rows.permutation(int(self.sizes[file_index]))

    def where(self, position: int) -> str:
        file_index, row = self.locate(position)
        return f"row {row} of '{self.files[file_index]}'"

    def sample(self, position: int, rng) -> list[np.ndarray]:
        file_index, row = self.locate(position)
        return [array[row] for array in self._load(file_index)]

    def batch(self, positions) -> list[np.ndarray] | None:
        """Each top's rows for ``positions`` at once (what ``sample`` gives one at a time);
        None where the rows' files differ in a top's row shape (``sample`` names the row)."""
        files, rows = self.locate_many(np.asarray(positions, dtype=np.int64))
        if (files == files[0]).all():  # the usual case: one file, one fancy index per top
            return [array[rows] for array in self._load(int(files[0]))]
        loaded = {int(f): self._load(int(f)) for f in np.unique(files)}
        first = next(iter(loaded.values()))
        if any(a.shape[1:] != b.shape[1:] for arrays in loaded.values()
               for a, b in zip(arrays, first)):  # fmt: skip
            return None
        out = [np.empty((len(rows), *a.shape[1:]), a.dtype) for a in first]
        for file_index, arrays in loaded.items():
            pick = files == file_index
            for array, whole in zip(out, arrays):
                array[pick] = whole[rows[pick]]
        return out


class MemorySource(Source):
    """MemoryData: the arrays last given with ``set_input_arrays``, served in order and from
    the start again after each new call (Caffe's Reset sets its position to 0)."""

    in_process = True
    records_change = True  # set_input_arrays gives new arrays between any two batches

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

    def batch(self, positions) -> list[np.ndarray]:
        """Both arrays' rows for ``positions`` at once (as ``sample`` one at a time)."""
        arrays = self._arrays()
        positions = np.asarray(positions, dtype=np.int64)
        if arrays is not self._seen:
            self._seen, self._base = arrays, int(positions[0])
        rows = (positions - self._base) % len(arrays[0])
        return [np.asarray(arrays[0])[rows], np.asarray(arrays[1])[rows]]
