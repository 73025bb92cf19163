"""Feeds a net's data layers: ``for batch in make_feed(net): net(**batch)``.

Each data layer (Data, ImageData, HDF5Data, MemoryData) gets its source and transformer; batches
are made in torch.utils.data worker processes and arrive as float32 tensors by top name (labels
as floats, as Caffe's blobs hold them), pinned and copied ahead to a CUDA device when one is
given. Batch b of a layer holds this rank's stream positions (b*B + i)*world_size + rank, so
ranks share records as Caffe's DataLayer::Skip does; worker k makes batches k, k+K, ... and the
DataLoader hands them out round robin, so the output is the same for any worker count. Random
draws for a record come from a generator seeded with (seed, layer, position): a run repeats
exactly for a seed, and ``skip``/``state`` resume it at any batch.
"""

from __future__ import annotations

import itertools
import os
import secrets

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .array_sources import HDF5Source, MemorySource
from .sources import DataError, DBSource, ImageListSource
from .window_source import WindowSource

_MAKERS = {
    "Data": lambda lp, phase, seed, layer, shuffle: DBSource(lp, phase, seed, shuffle),
    "ImageData": lambda lp, phase, seed, layer, shuffle: ImageListSource(lp, phase, seed),
    "HDF5Data": lambda lp, phase, seed, layer, shuffle: HDF5Source(lp, phase, seed),
    "MemoryData": lambda lp, phase, seed, layer, shuffle: MemorySource(lp, phase, seed, layer),
    "WindowData": lambda lp, phase, seed, layer, shuffle: WindowSource(lp, phase, seed),
}
_BATCH = {"Data": "data_param", "ImageData": "image_data_param", "HDF5Data": "hdf5_data_param"}


class _Plan:
    """One data layer: its source, batch size and the shapes the net declared for its tops."""

    def __init__(self, index, source, tops, shapes):
        self.index, self.source, self.tops = index, source, tops
        self.batch = shapes[0][0]
        self.shapes = [tuple(s[1:]) for s in shapes]

    def make_batch(self, b: int, seed: int, rank: int, world: int) -> dict[str, np.ndarray]:
        out = [_batch_array((self.batch, *s)) for s in self.shapes]
        for i in range(self.batch):
            position = (b * self.batch + i) * world + rank
            rng = np.random.default_rng((seed, self.index, position))
            for k, value in enumerate(self.source.sample(position, rng)[: len(out)]):
                if np.shape(value) != self.shapes[k]:
                    raise self._mismatch(position, k, np.shape(value))
                out[k][i] = value
        return dict(zip(self.tops, out))

    def _mismatch(self, position, k, shape) -> DataError:
        return self.source.fail(
            f"{self.source.where(position)} gives top '{self.tops[k]}' the shape {tuple(shape)}, "
            f"but the net declared {self.shapes[k]} (from the first record); Caffe needs equal "
            "shapes unless the images are resized or cropped"
        )


class _Batches(IterableDataset):
    def __init__(self, plans, seed, rank, world, start):
        self.plans, self.seed, self.rank, self.world, self.start = plans, seed, rank, world, start

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for b in itertools.count(self.start + worker, workers):
            batch = {}
            for plan in self.plans:
                batch.update(plan.make_batch(b, self.seed, self.rank, self.world))
            yield {name: torch.from_numpy(array) for name, array in batch.items()}


def _batch_array(shape) -> np.ndarray:
    """A float32 array to fill; in a worker process it lives in shared memory from the start,
    so handing the batch to the main process copies nothing."""
    if get_worker_info() is None:
        return np.empty(shape, np.float32)
    return torch.empty(shape, dtype=torch.float32).share_memory_().numpy()


def _default_workers(device) -> int:
    """Workers pay off when a GPU computes while the CPU decodes; on a CPU-only run they compete
    with the net for the same cores and add a shared-memory copy per batch (measured slower on
    2 cores), so the batches are made in the calling process there."""
    if device is None or device.type == "cpu":
        return 0
    return max(1, min(4, (os.cpu_count() or 2) // 4))


class DataFeed:
    """An endless iterator of {top name: tensor} batches for a net's data layers."""

    def __init__(self, net, *, seed=None, rank=0, world_size=1, workers=None, device=None,
                 prefetch=None, shuffle_db=False):  # fmt: skip
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.seed = secrets.randbits(63) if seed is None or seed < 0 else int(seed)
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device) if device is not None else None
        self.plans = _plans(net, self.seed, shuffle_db)
        for plan in self.plans:  # WindowData finds an item's place in its batch from it
            plan.source.world_size = world_size
        in_process = any(p.source.in_process for p in self.plans)
        if workers is None:
            workers = _default_workers(self.device)
        self.workers = 0 if in_process else workers
        self.prefetch = prefetch or _prefetch(net) or 4
        self.position = 0  # batches handed out so far
        self._iterator = None

    @property
    def tops(self) -> list[str]:
        return [t for p in self.plans for t in p.tops]

    def state(self) -> dict:
        """What a solver snapshot needs to resume the data where it stopped."""
        return {"position": self.position, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size}  # fmt: skip

    def load_state(self, state: dict) -> None:
        if (state["seed"], state["world_size"]) != (self.seed, self.world_size):
            raise ValueError("the saved data state was made with another seed or world size")
        self.skip(state["position"] - self.position)

    def skip(self, n_batches: int) -> None:
        """Move on (or back) by whole batches without reading them."""
        self.position += int(n_batches)
        self.close()

    def close(self) -> None:
        self._iterator = None  # dropping the DataLoader iterator stops its workers

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._iterator is None:
            self._iterator = iter(self._loader())
        batch = next(self._iterator)
        self.position += 1
        if self.device is not None:
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        return batch

    def _loader(self) -> DataLoader:
        dataset = _Batches(self.plans, self.seed, self.rank, self.world_size, self.position)
        extra = {"prefetch_factor": self.prefetch, "persistent_workers": False}
        return DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.workers,
            pin_memory=self.device is not None and self.device.type == "cuda",
            **(extra if self.workers else {}),
        )


def _prefetch(net) -> int:
    values = [lp.data_param.prefetch for lp in net.net_param.layer if lp.type == "Data"]
    return max(values, default=0)


def _plans(net, seed: int, shuffle_db: bool) -> list[_Plan]:
    plans = []
    for index, (name, kind) in enumerate(zip(net.layer_names, net.layer_types)):
        layer = net.layer(name)
        if not layer.is_source or kind in ("Input", "DummyData"):
            continue
        lp = net.net_param.layer[index]
        if kind not in _MAKERS:
            raise DataError(f"the loader cannot read {kind} layers", layer=name, layer_type=kind)
        source = _MAKERS[kind](lp, net.phase, seed, layer, shuffle_db)
        shapes = [net.blob_shapes[t] for t in lp.top]
        plans.append(_Plan(index, source, list(lp.top), shapes))
    return plans


def make_feed(net, **kwargs) -> DataFeed:
    """A DataFeed for ``net`` (see DataFeed for seed, rank, world_size, workers, device)."""
    return DataFeed(net, **kwargs)
