"""Feeds a net's data layers: ``for batch in make_feed(net): net(**batch)``.

Each data layer (Data, ImageData, HDF5Data, MemoryData, WindowData, AnnotatedData, and the
segmentation forks' DenseImageData and ImageSegData) gets its source and transformer; batches
arrive as float32 tensors by top name (labels as floats, as Caffe's blobs hold them) on the
feed's device. Batch b of a layer holds this rank's stream positions (b*B + i)*world_size +
rank, so ranks share records as Caffe's DataLayer::Skip does. Random draws for a record come
from a generator seeded with (seed, layer, position): a run repeats exactly for a seed,
whichever process makes the record and however many workers there are, and ``skip``/``state``
resume it at any batch.

How records travel (Caffe's prefetch ring, ring.py): uint8 images (raw or decoded Datums,
ImageData) are cropped and mirrored where they are read, and travel as uint8 with their draws;
the transformer's mean and scale then run on the device (device_transform.py) with the CPU
transformer's float32 operations, so the numbers are the same. Float records (float_data
Datums, HDF5Data, MemoryData), WindowData (zero padding, a mean indexed by the output),
AnnotatedData and the segmentation sources (an image and its label image, cropped and mirrored
together) are transformed on the CPU and travel as float32; AnnotatedData's label top (as
many box rows as the batch has) travels beside the buffer. Batches are made in the calling
process (``workers=0``) or by worker processes into a ring of ``prefetch`` shared batch buffers
made once and reused; on a CUDA device each batch is copied into pinned memory and sent with a
non-blocking copy on a side stream, so the copy overlaps the work queued before it. With
``decode="gpu"`` encoded (JPEG) Datums are read in the calling process and decoded on the device
by torchvision.
"""

from __future__ import annotations

import os
import secrets

import numpy as np
import torch

from ..errors import CaffeAlexError
from .annotated import AnnotatedSource, stack_box_rows
from .array_sources import HDF5Source, MemorySource
from .datum import color_flag
from .device_transform import DeviceTransform, crop_on_device, decode_jpegs, torchvision_io
from .ring import Layout, Ring, WorkerPool
from .segmentation import DenseImageSource, ImageSegSource
from .sources import DataError, DBSource, ImageListSource
from .window_source import WindowSource

DECODES = ("cpu", "gpu")


def open_source(lp, phase: str, seed: int, layer, shuffle_db: bool):
    """The source behind a data layer (``layer``: the built layer, whose arrays MemoryData
    reads; ``shuffle_db``: Data only)."""
    if lp.type == "Data":
        return DBSource(lp, phase, seed, shuffle_db)
    if lp.type == "ImageData":
        return ImageListSource(lp, phase, seed)
    if lp.type == "HDF5Data":
        return HDF5Source(lp, phase, seed)
    if lp.type == "MemoryData":
        return MemorySource(lp, phase, seed, layer)
    if lp.type == "WindowData":
        return WindowSource(lp, phase, seed)
    if lp.type == "AnnotatedData":
        return AnnotatedSource(lp, phase, seed, shuffle_db)
    if lp.type == "DenseImageData":
        return DenseImageSource(lp, phase, seed)
    if lp.type == "ImageSegData":
        return ImageSegSource(lp, phase, seed)
    raise DataError(f"the loader cannot read {lp.type} layers", layer=lp.name, layer_type=lp.type)


class _LayerFeed:
    """One data layer's share of each batch: its source, batch size, the shapes the net
    declared for its tops, and how its records travel (``travel``): "pixels" (uint8 crops,
    transformed on the device), "arrays" (float32, transformed on the CPU), "decode"
    (encoded bytes, decoded on the device) or "boxes" (float32 images in the ring, and each
    image's box rows, of no fixed number, beside it: AnnotatedData's label top)."""

    def __init__(self, index, source, tops, shapes, travel="arrays"):
        self.index, self.source, self.tops, self.travel = index, source, tops, travel
        self.batch = shapes[0][0]
        self.shapes = [tuple(s[1:]) for s in shapes]

    def _rng(self, seed: int, position: int):
        if not self.source.needs_rng:
            return None
        return np.random.default_rng((seed, self.index, position))

    def _positions(self, b: int, rank: int, world: int) -> range:
        start = b * self.batch * world + rank
        return range(start, start + self.batch * world, world)

    # -- the ring's arrays -------------------------------------------------------------
    def arrays(self) -> dict:
        """This layer's arrays in a batch buffer: key -> (dtype, shape)."""
        n, key = self.batch, f"{self.index}/"
        if self.travel == "boxes":
            return {key + "0": (np.float32, (n, *self.shapes[0]))}
        if self.travel == "pixels":
            out = {key + "pixels": (np.uint8, (n, *self.shapes[0]))}
            out[key + "draws"] = (np.int32, (n, 3))
            if len(self.tops) > 1:
                out[key + "label"] = (np.float32, (n,))
            return out
        return {f"{key}{k}": (np.float32, (n, *s)) for k, s in enumerate(self.shapes)}

    def fill(self, views: dict, b: int, seed: int, rank: int, world: int):
        """Batch b into the buffer; for "boxes", returns the batch's label top (which has
        no fixed size, so it travels beside the buffer)."""
        key = f"{self.index}/"
        if self.travel == "boxes":
            return self._fill_boxes(views[key + "0"], b, seed, rank, world)
        if self.travel == "arrays" and self._fill_at_once(views, key, b, rank, world):
            return None
        for i, position in enumerate(self._positions(b, rank, world)):
            rng = self._rng(seed, position)
            if self.travel == "pixels":
                self._fill_pixels(views, key, i, position, rng)
                continue
            for k, value in enumerate(self.source.sample(position, rng)[: len(self.shapes)]):
                if np.shape(value) != self.shapes[k]:
                    raise self._mismatch(position, k, np.shape(value))
                views[f"{key}{k}"][i] = value

    @property
    def reads_whole_batches(self) -> bool:
        """Whether the source reads a whole batch at once (HDF5Data, MemoryData: one fancy
        index per top instead of a Python call per record)."""
        source = self.source
        return self.travel == "arrays" and hasattr(source, "batch") and not source.needs_rng

    def whole_batch(self, b, rank, world, count: int = 1) -> list[np.ndarray] | None:
        """Batch b of each top (with ``count``, batches b to b + count - 1, one after the
        other) as a new float32 array of the declared shape, read at once; None where the
        source cannot or a row's shape is not the declared one (the per-record path then
        names the row)."""
        # consecutive batches of a rank are one stride-world run of stream positions
        first, last = self._positions(b, rank, world), self._positions(b + count - 1, rank, world)
        positions = np.arange(first.start, last.stop, first.step, dtype=np.int64)
        got = self.source.batch(positions)  # new arrays (fancy indexing), never views
        if got is None or len(got) < len(self.shapes):
            return None
        if any(np.shape(v)[1:] != s for v, s in zip(got, self.shapes)):
            return None
        return [np.asarray(v, dtype=np.float32) for v in got[: len(self.shapes)]]

    def _fill_at_once(self, views, key, b, rank, world) -> bool:
        """The whole batch into the buffer at once (see ``whole_batch``); False where not."""
        if not self.reads_whole_batches:
            return False
        got = self.whole_batch(b, rank, world)
        if got is None:
            return False
        for k, values in enumerate(got):
            views[f"{key}{k}"][...] = values
        return True

    def _fill_boxes(self, images, b, seed, rank, world) -> np.ndarray:
        rows = []
        for i, position in enumerate(self._positions(b, rank, world)):
            image, boxes = self.source.sample(position, self._rng(seed, position))
            if image.shape != self.shapes[0]:
                raise self._mismatch(position, 0, image.shape)
            images[i] = image
            rows.append(boxes)
        return stack_box_rows(rows)

    def _fill_pixels(self, views, key, i, position, rng) -> None:
        image, label = self.source.read(position)
        if image.dtype != np.uint8:
            raise self.source.fail(
                f"{self.source.where(position)} holds float_data, but the first record holds "
                "uint8 pixels; a source must keep to one kind"
            )
        region, draws = self._crop(image, rng, position)
        if draws[0]:
            region = region[:, :, ::-1]
        if region.shape != self.shapes[0]:
            raise self._mismatch(position, 0, region.shape)
        views[key + "pixels"][i] = region
        views[key + "draws"][i] = draws
        if len(self.tops) > 1:
            views[key + "label"][i] = label

    def _crop(self, image, rng, position):
        try:
            return self.source.transformer.crop_region(image, rng)
        except (CaffeAlexError, ValueError) as exc:
            message = exc.message if isinstance(exc, CaffeAlexError) else str(exc)
            raise self.source.fail(f"{self.source.where(position)}: {message}") from None

    # -- decoding on the device ------------------------------------------------------------
    def decode_batch(self, b, seed, rank, world, device) -> tuple:
        """(uint8 crops (N, C, h, w), draws (N, 3), labels (N,)) with the images decoded on
        ``device``; records that are not encoded are read as usual."""
        source, t = self.source, self.source.transformer
        positions = list(self._positions(b, rank, world))
        records = [source.datum(p) for p in positions]
        labels = np.array([datum.label for _, datum in records], np.float32)
        encoded = [i for i, (_, datum) in enumerate(records) if datum.encoded]
        images = [None] * len(records)
        try:
            decoded = decode_jpegs(
                [records[i][1].data for i in encoded],
                color_flag(t.force_color, t.force_gray),
                device,
                lambda k: source.where(positions[encoded[k]]),
            )
        except CaffeAlexError as exc:
            raise source.fail(exc.message) from None
        for i, image in zip(encoded, decoded):
            images[i] = image
        crops, draws = [], np.empty((len(records), 3), np.int32)
        for i, position in enumerate(positions):
            if images[i] is None:
                image, _ = source.read(position)
                images[i] = torch.from_numpy(image).to(device)
            try:
                crop, draws[i] = crop_on_device(images[i], t, self._rng(seed, position))
            except (CaffeAlexError, ValueError) as exc:
                message = exc.message if isinstance(exc, CaffeAlexError) else str(exc)
                raise source.fail(f"{source.where(position)}: {message}") from None
            if tuple(crop.shape) != self.shapes[0]:
                raise self._mismatch(position, 0, tuple(crop.shape))
            crops.append(crop)
        return torch.stack(crops), draws, labels

    def _mismatch(self, position, k, shape) -> DataError:
        return self.source.fail(
            f"{self.source.where(position)} gives top '{self.tops[k]}' the shape {tuple(shape)}, "
            f"but the net declared {self.shapes[k]} (from the first record); Caffe needs equal "
            "shapes unless the images are resized or cropped"
        )


class _Filler:
    """What a worker (or the calling process) runs: batch b of every ring layer into a slot."""

    def __init__(self, layers, seed, rank, world):
        self.layers, self.seed, self.rank, self.world = layers, seed, rank, world

    def __call__(self, views: dict, b: int) -> dict:
        """Fills the buffer; returns what travels beside it (layer index -> label top)."""
        extra = {}
        for layer in self.layers:
            made = layer.fill(views, b, self.seed, self.rank, self.world)
            if made is not None:
                extra[layer.index] = made
        return extra


class _InProcess:
    """Batches made in the calling process, into one buffer made once."""

    def __init__(self, fill, layout: Layout):
        self.fill, self.ring = fill, Ring(layout, 1, shared=False)
        self.extra = None

    def take(self, b: int) -> dict:
        self.extra = self.fill(self.ring.views[0], b)
        return self.ring.views[0]

    def give_back(self) -> None:
        pass

    def close(self) -> None:
        pass


class _ToCuda:
    """Batch buffers -> tensors on a CUDA device: each batch is copied into one of two pinned
    buffers (used in turn, the older one reused once its copy is done) and sent with a
    non-blocking copy on a side stream, which the current stream waits for; so the copy runs
    while the GPU is still busy with the work queued before it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.pinned: list[dict | None] = [None, None]
        self.events: list = [None, None]
        self.turn = 0

    def __call__(self, views: dict) -> dict[str, torch.Tensor]:
        k, self.turn = self.turn, 1 - self.turn
        if self.events[k] is not None:
            self.events[k].synchronize()
        if self.pinned[k] is None:
            self.pinned[k] = {
                key: torch.empty(a.shape, dtype=torch.from_numpy(a[:0]).dtype, pin_memory=True)
                for key, a in views.items()
            }
        pinned = self.pinned[k]
        for key, array in views.items():
            pinned[key].copy_(torch.from_numpy(array))
        with torch.cuda.stream(self.stream):
            moved = {key: t.to(self.device, non_blocking=True) for key, t in pinned.items()}
            self.events[k] = torch.cuda.Event()
            self.events[k].record(self.stream)
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.stream)
        for tensor in moved.values():
            tensor.record_stream(current)
        return moved


def _default_workers(device) -> int:
    """Workers pay off when a GPU computes while the CPU decodes; on a CPU-only run they compete
    with the net for the same cores, so the batches are made in the calling process there."""
    if device is None or device.type == "cpu":
        return 0
    return max(1, min(4, (os.cpu_count() or 2) // 4))


class DataFeed:
    """An endless iterator of {top name: tensor} batches for a net's data layers.

    ``workers``: processes making batches (None: none on a CPU run, up to 4 beside a GPU);
    ``prefetch``: batches in the ring (default data_param.prefetch, 4); ``decode``: "cpu"
    (OpenCV, where the records are read) or "gpu" (torchvision's decoder on ``device`` for
    JPEG Datums)."""

    def __init__(self, net, *, seed=None, rank=0, world_size=1, workers=None, device=None,
                 prefetch=None, shuffle_db=False, decode="cpu"):  # fmt: skip
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if decode not in DECODES:
            raise CaffeAlexError(f"decode must be one of {', '.join(DECODES)}, got '{decode}'")
        if decode == "gpu":
            torchvision_io()  # a one-line error now rather than at the first batch
        self.seed = secrets.randbits(63) if seed is None or seed < 0 else int(seed)
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device) if device is not None else None
        self.decode = decode
        self.layers = _layer_feeds(net, self.seed, shuffle_db, decode)
        for layer in self.layers:  # WindowData finds an item's place in its batch from it
            layer.source.world_size = world_size
        in_process = any(p.source.in_process for p in self.layers)
        if workers is None:
            workers = _default_workers(self.device)
        self.workers = 0 if in_process else workers
        self.prefetch = prefetch or _prefetch(net) or 4
        self.position = 0  # batches handed out so far
        self._transforms = {
            p.index: self._device_half(p) for p in self.layers if p.travel in ("pixels", "decode")
        }
        self._to_cuda = None
        self._producer = None
        # (position of the first, batches read ahead, each top's whole array and batch size)
        self._ahead: tuple[int, int, dict] = (0, 0, {})
        # in-process arrays on the CPU go from the source to the batch without the buffer
        self._direct = (
            bool(self.layers)
            and self.workers == 0
            and (self.device is None or self.device.type == "cpu")
            and all(p.reads_whole_batches for p in self.layers)
        )
        self._ahead_count = _read_ahead_count(self.layers) if self._direct else 1

    def _device_half(self, layer: _LayerFeed) -> DeviceTransform:
        try:
            return DeviceTransform(layer.source.transformer, layer.shapes[0][0], self.device)
        except ValueError as exc:  # LayerConfigError: mean_value against the channels
            raise layer.source.fail(str(exc)) from None

    @property
    def tops(self) -> list[str]:
        return [t for p in self.layers for t in p.tops]

    def state(self) -> dict:
        """What a solver snapshot needs to resume the data where it stopped."""
        return {"position": self.position, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size}  # fmt: skip

    def where(self, item: int) -> str | None:
        """The record(s) behind item ``item`` of the last batch handed out, for messages."""
        if self.position == 0:
            return None
        places = []
        for layer in self.layers:
            positions = layer._positions(self.position - 1, self.rank, self.world_size)
            if 0 <= item < len(positions):
                places.append(layer.source.where(positions[item]))
        return "; ".join(places) or None

    def load_state(self, state: dict) -> None:
        if (state["seed"], state["world_size"]) != (self.seed, self.world_size):
            raise ValueError("the saved data state was made with another seed or world size")
        self.skip(state["position"] - self.position)

    def skip(self, n_batches: int) -> None:
        """Move on (or back) by whole batches without reading them."""
        self.position += int(n_batches)
        self.close()

    def close(self) -> None:
        """Stop the workers (the next batch starts them again at the feed's position)."""
        producer, self._producer = getattr(self, "_producer", None), None
        if producer is not None:
            producer.close()
        self._ahead = (0, 0, {})

    def __del__(self):
        self.close()

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        try:
            batch = self._next_batch()
        except BaseException:
            self.close()  # a failed or interrupted batch leaves no worker behind
            raise
        self.position += 1
        return batch

    # -- the uint8 ring ----------------------------------------------------------------------
    def _ring_layers(self) -> list[_LayerFeed]:
        return [p for p in self.layers if p.travel != "decode"]

    def _start(self):
        layers = self._ring_layers()
        layout = Layout({k: v for p in layers for k, v in p.arrays().items()})
        fill = _Filler(layers, self.seed, self.rank, self.world_size)
        if self.workers and layers:
            depth = max(self.prefetch, self.workers)
            return WorkerPool(fill, layout, self.workers, depth, self.position)
        return _InProcess(fill, layout)

    def _next_batch(self) -> dict[str, torch.Tensor]:
        if self._direct:
            batch = self._direct_batch()
            if batch is not None:
                return batch
        if self._producer is None:
            self._producer = self._start()
        views = self._producer.take(self.position)
        tensors = self._move(views)
        batch = {}
        for layer in self._ring_layers():
            key = f"{layer.index}/"
            if layer.travel == "boxes":
                batch[layer.tops[0]] = self._own(tensors[key + "0"])
                if len(layer.tops) > 1:
                    label = torch.from_numpy(self._producer.extra[layer.index])
                    batch[layer.tops[1]] = label.to(self.device) if self.device else label
            elif layer.travel == "pixels":
                pixels, draws = tensors[key + "pixels"], tensors[key + "draws"]
                batch[layer.tops[0]] = self._transforms[layer.index](pixels, draws)
                if len(layer.tops) > 1:
                    batch[layer.tops[1]] = self._own(tensors[key + "label"])
            else:
                for k, top in enumerate(layer.tops):
                    batch[top] = self._own(tensors[f"{key}{k}"])
        self._producer.give_back()  # everything is copied out of the buffer now
        for layer in self.layers:
            if layer.travel == "decode":
                batch.update(self._decoded(layer))
        return batch

    def _direct_batch(self) -> dict[str, torch.Tensor] | None:
        """The batch straight from the sources' arrays, as tensors owning them: no buffer and
        no copy out of it (the logreg net's feed took 80 us per batch of its training loop
        through the buffer, 50 this way); None where a source cannot give it whole (the
        buffer's path then names the record). Small batches of sources whose records stay
        put (HDF5Data) are read ``_ahead_count`` at a time, one fancy index per top for them
        all, and handed out as slices of those arrays (logreg: 50 -> 5 us per batch)."""
        index = self._ahead_index(1)
        if index is None:
            return None
        _, count, wholes = self._ahead
        if count == 1:
            return {top: whole for top, (whole, _) in wholes.items()}
        return {top: whole[index * size : (index + 1) * size]
                for top, (whole, size) in wholes.items()}  # fmt: skip

    @property
    def takes_at_most(self) -> int:
        """How many batches ``take`` hands out at once at most (0: it never does)."""
        return self._ahead_count if self._direct else 0

    def take(self, count: int) -> dict[str, torch.Tensor] | None:
        """The next ``count`` batches at once, each top's stacked on a new first axis (count
        x batch x ...: views of what the direct path read ahead, no copy), for a caller that
        trains on them together (the captured step's chunk); None where they do not come
        that way (the buffer's path, or rows that do not read whole): nothing is taken then,
        and ``next`` hands them out one by one."""
        if not self._direct or not 0 < count <= self._ahead_count:
            return None
        index = self._ahead_index(count)
        if index is None:
            return None
        taken = {top: whole[index * size : (index + count) * size].view(count, size,
                                                                         *whole.shape[1:])
                 for top, (whole, size) in self._ahead[2].items()}  # fmt: skip
        self.position += count
        return taken

    def _ahead_index(self, count: int) -> int | None:
        """Where batch ``position`` lies in what was read ahead, reading afresh from it where
        the ``count`` batches from there are not all read; None where the sources cannot
        give them whole."""
        first, ahead_count, _ = self._ahead
        index = self.position - first
        if 0 <= index and index + count <= ahead_count:
            return index
        ahead = self._read(self._ahead_count)
        if ahead is None and count == 1 and self._ahead_count > 1:  # another shape ahead
            ahead = self._read(1)
        if ahead is None:
            return None
        self._ahead = ahead
        return 0

    def _read(self, count: int) -> tuple[int, int, dict] | None:
        """Batches position .. position + count - 1 from the sources at once (see above):
        (that position, count, each top's whole array of them and its batch size)."""
        wholes = {}
        for layer in self.layers:
            got = layer.whole_batch(self.position, self.rank, self.world_size, count)
            if got is None:
                return None
            for top, values in zip(layer.tops, got):
                wholes[top] = (torch.from_numpy(values), layer.batch)
        return self.position, count, wholes

    def _move(self, views: dict) -> dict[str, torch.Tensor]:
        """The buffer's arrays on the feed's device (on a CPU: views of the buffer itself)."""
        device = self.device
        if device is None or device.type == "cpu":
            return {key: torch.from_numpy(array) for key, array in views.items()}
        if device.type == "cuda":
            if self._to_cuda is None:
                self._to_cuda = _ToCuda(device)
            return self._to_cuda(views)
        return {key: torch.from_numpy(array).to(device) for key, array in views.items()}

    def _own(self, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor the caller may keep: buffer views are copied, moved tensors are new."""
        if self.device is None or self.device.type == "cpu":
            return tensor.clone()
        return tensor

    def _decoded(self, layer: _LayerFeed) -> dict[str, torch.Tensor]:
        device = self.device or torch.device("cpu")
        crops, draws, labels = layer.decode_batch(
            self.position, self.seed, self.rank, self.world_size, device
        )
        out = {layer.tops[0]: self._transforms[layer.index](crops, torch.from_numpy(draws))}
        if len(layer.tops) > 1:
            out[layer.tops[1]] = torch.from_numpy(labels).to(device)
        return out


# Batches read ahead at once: up to 64, as many as fit in 1 MiB (at least one)
_AHEAD_BATCHES, _AHEAD_BYTES = 64, 1 << 20


def _read_ahead_count(layers: list[_LayerFeed]) -> int:
    """How many batches the direct path reads at once: one where a record may change
    between batches (MemoryData's set_input_arrays), else as many small ones as fit."""
    if any(layer.source.records_change for layer in layers):
        return 1
    nbytes = sum(4 * layer.batch * int(np.prod(shape)) for layer in layers
                 for shape in layer.shapes)  # fmt: skip
    return max(1, min(_AHEAD_BATCHES, _AHEAD_BYTES // max(nbytes, 1)))


def _prefetch(net) -> int:
    values = [lp.data_param.prefetch for lp in net.net_param.layer
              if lp.type in ("Data", "AnnotatedData")]  # fmt: skip
    return max(values, default=0)


def _travel(source, decode: str) -> str:
    """How a source's records reach the device: see _LayerFeed."""
    if getattr(source, "box_rows", False):
        return "boxes"
    if source.transformer is None or source.storage == "float":
        return "arrays"
    return "decode" if source.storage == "encoded" and decode == "gpu" else "pixels"


def _layer_feeds(net, seed: int, shuffle_db: bool, decode: str) -> list[_LayerFeed]:
    feeds = []
    for index, (name, kind) in enumerate(zip(net.layer_names, net.layer_types)):
        built = net.layer(name)
        if not built.is_source or kind in ("Input", "DummyData"):
            continue
        lp = net.net_param.layer[index]
        source = open_source(lp, net.phase, seed, built, shuffle_db)
        shapes = [net.blob_shapes[t] for t in lp.top]
        feeds.append(_LayerFeed(index, source, list(lp.top), shapes, _travel(source, decode)))
    return feeds


def make_feed(net, **kwargs) -> DataFeed:
    """A DataFeed for ``net`` (see DataFeed for seed, rank, world_size, workers, device,
    prefetch, shuffle_db and decode)."""
    return DataFeed(net, **kwargs)
