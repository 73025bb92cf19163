"""What each data layer reads: one source class per layer type (Data, ImageData, HDF5Data,
MemoryData), with random access by *stream position*.

A layer reads an endless stream: the records in order (key order, list order, file order), then
again from the first, as Caffe's layers restart. ``rand_skip`` starts the stream a random number
of records in; ``shuffle`` permutes each pass anew. Position p of the stream is a pure function
of (seed, p), so loader workers can each produce their own batches, a rank can take every
world_size-th record (Caffe's DataLayer::Skip rule), and a run can resume anywhere.
``sample(p, rng)`` returns one array per top: the transformed image (C, H, W) and the label.
Sources with a DataTransformer (Data, ImageData) also give ``read(p)``: the image before the
transform (uint8 for raw and encoded records, float32 for float_data) and the label, which the
feed crops where it reads and transforms on the device (loader.py). ``storage`` says what their
records hold: "uint8", "encoded" or "float" (a Data source tells from its first record).
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np

from ..errors import CaffeAlexError
from ..proto import caffe_pb2
from .datum import datum_to_array, load_image, parse_datum
from .db import open_db
from .transformer import DataTransformer


class DataError(CaffeAlexError):
    """Bad data met while reading a source (the layer is named)."""


class Order:
    """Stream position -> record index: ``skip`` records in, then pass after pass."""

    def __init__(self, n: int, seed: int, shuffle: bool = False, rand_skip: int = 0):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        # Caffe draws the skip as rand() % rand_skip and needs that many records to exist.
        self.skip = int(np.random.default_rng((seed, 1)).integers(rand_skip)) if rand_skip else 0
        if self.skip and self.skip >= n:
            raise CaffeAlexError(f"not enough records ({n}) to skip {self.skip} (rand_skip)")
        self._permutation = lru_cache(maxsize=2)(self._make_permutation)

    def _make_permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng((self.seed, 2, epoch)).permutation(self.n)

    def epoch_and_index(self, position: int) -> tuple[int, int]:
        epoch, index = divmod(position + self.skip, self.n)
        return epoch, int(self._permutation(epoch)[index]) if self.shuffle else index


def transform_param(lp) -> caffe_pb2.TransformationParameter:
    """transform_param with the legacy per-layer fields (scale, mean_file, crop_size, mirror)
    folded in where it leaves them unset, as Caffe's upgrade of old nets does."""
    merged = caffe_pb2.TransformationParameter()
    merged.CopyFrom(lp.transform_param)
    own = next((getattr(lp, f) for f in ("data_param", "image_data_param") if lp.HasField(f)), None)
    for name in ("scale", "mean_file", "crop_size", "mirror"):
        if own is not None and own.HasField(name) and not merged.HasField(name):
            setattr(merged, name, getattr(own, name))
    return merged


class Source:
    """Base: ``len(source)`` records, ``sample(position, rng)`` -> arrays, ``where(position)``."""

    needs_rng = False
    in_process = False  # True: must run in the feeding process (arrays given from Python)
    records_change = False  # True: a position's record may change between reads (MemoryData)
    transformer = None  # a DataTransformer where the layer transforms its images
    storage = "float"

    def __init__(self, lp, phase: str, seed: int):
        self.lp, self.phase, self.seed = lp, phase, seed
        self.name, self.type = lp.name, lp.type

    def fail(self, message: str) -> DataError:
        return DataError(message, layer=self.name, layer_type=self.type)


def _check_source_path(source: Source, path: str) -> None:
    if not path or not os.path.exists(path):
        raise source.fail(f"source '{path}' does not exist")


def open_records(source: Source, p, seed: int, shuffle: bool) -> None:
    """Open data_param ``p``'s database for ``source``: its path, backend, keys and their order
    (Data's records, and the sources that read other records from such a database: SSD's)."""
    _check_source_path(source, p.source)
    source.path = p.source
    source.backend = caffe_pb2.DataParameter.DB.Name(p.backend).lower()
    source.in_process = source.backend == "leveldb"  # LevelDB: one process at a time
    try:
        # db.py shares one handle per process and reopens it in a forked worker
        source.db = open_db(p.source, source.backend)
        source.keys = list(source.db.keys())
    except CaffeAlexError as exc:
        raise source.fail(exc.message) from None
    if not source.keys:
        raise source.fail(f"source '{p.source}' holds no record")
    source.order = Order(len(source.keys), seed, shuffle, p.rand_skip)


class DBSource(Source):
    """Data: Datums from an LMDB or LevelDB, decoded and transformed (data_param.rand_skip;
    ``shuffle=True`` from the loader permutes each pass, an extension Caffe lacks). LevelDB
    allows one process at a time, so a LevelDB source is read in the feeding process."""

    def __init__(self, lp, phase, seed, shuffle: bool = False):
        super().__init__(lp, phase, seed)
        open_records(self, lp.data_param, seed, shuffle)
        self.transformer = DataTransformer(transform_param(lp), phase)
        self.needs_rng = self.transformer.needs_rng
        self.storage = self._storage(self.keys[0])

    def __len__(self):
        return len(self.keys)

    def _storage(self, key: bytes) -> str:
        try:
            datum = parse_datum(self.db.get(key), key)
        except CaffeAlexError as exc:
            raise self.fail(f"{exc.message} (in '{self.path}')") from None
        return "encoded" if datum.encoded else ("uint8" if datum.data else "float")

    def where(self, position: int) -> str:
        key = self.keys[self.order.epoch_and_index(position)[1]]
        return f"record '{key.decode(errors='replace')}' of '{self.path}'"

    def datum(self, position: int) -> tuple[bytes, caffe_pb2.Datum]:
        """The key and parsed Datum at a stream position."""
        key = self.keys[self.order.epoch_and_index(position)[1]]
        try:
            return key, parse_datum(self.db.get(key), key)
        except CaffeAlexError as exc:
            raise self.fail(f"{exc.message} (in '{self.path}')") from None

    def read(self, position: int) -> tuple[np.ndarray, np.float32]:
        key, datum = self.datum(position)
        t = self.transformer
        try:
            return datum_to_array(datum, key, t.force_color, t.force_gray), np.float32(datum.label)
        except (CaffeAlexError, ValueError) as exc:
            raise self.fail(f"{_message(exc)} (in '{self.path}')") from None

    def sample(self, position: int, rng) -> list[np.ndarray]:
        image, label = self.read(position)
        try:
            return [self.transformer(image, rng), label]
        except (CaffeAlexError, ValueError) as exc:
            raise self.fail(f"{_message(exc)} (in '{self.path}')") from None


def _message(exc: Exception) -> str:
    return exc.message if isinstance(exc, CaffeAlexError) else str(exc)


def read_image_list(path: str) -> list[tuple[str, int]]:
    """'<path> <label>' lines; the label follows the last space, so paths may hold spaces."""
    entries = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            name, _, label = line.rpartition(" ")
            try:
                if not name:
                    raise ValueError
                entries.append((name, int(label)))
            except ValueError:
                raise CaffeAlexError(
                    f"{path}:{number}: expected '<image path> <integer label>', got {line!r}"
                ) from None
    if not entries:
        raise CaffeAlexError(f"image list '{path}' is empty")
    return entries


class ImageListSource(Source):
    """ImageData: image_data_param source, root_folder, new_height/new_width, is_color,
    shuffle (a new order each pass), rand_skip."""

    storage = "uint8"

    def __init__(self, lp, phase, seed):
        super().__init__(lp, phase, seed)
        p = self.param = lp.image_data_param
        _check_source_path(self, p.source)
        try:
            self.entries = read_image_list(p.source)
        except CaffeAlexError as exc:
            raise self.fail(exc.message) from None
        self.order = Order(len(self.entries), seed, p.shuffle, p.rand_skip)
        self.transformer = DataTransformer(transform_param(lp), phase)
        self.needs_rng = self.transformer.needs_rng

    def __len__(self):
        return len(self.entries)

    def where(self, position: int) -> str:
        name = self.entries[self.order.epoch_and_index(position)[1]][0]
        return f"image '{self.param.root_folder + name}'"

    def read(self, position: int) -> tuple[np.ndarray, np.float32]:
        name, label = self.entries[self.order.epoch_and_index(position)[1]]
        p = self.param
        try:
            image = load_image(p.root_folder + name, p.is_color, p.new_height, p.new_width)
        except (CaffeAlexError, ValueError) as exc:
            raise self.fail(_message(exc)) from None
        return image, np.float32(label)

    def sample(self, position: int, rng) -> list[np.ndarray]:
        image, label = self.read(position)
        try:
            return [self.transformer(image, rng), label]
        except (CaffeAlexError, ValueError) as exc:
            raise self.fail(_message(exc)) from None
