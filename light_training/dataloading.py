"""Loading preprocessed cases and sampling training patches (nnU-Net style foreground oversampling).

* :class:`CaseDataset` reads ``NAME.npz`` + ``NAME.json`` lazily (nothing is unpacked to disk); decompressed
  arrays can optionally be kept in memory (per process).
* :func:`choose_patch_start` / :func:`crop_with_padding` implement the patch geometry: random placement that may
  hang over the border by up to half the missing size when the case is smaller than the patch, or placement
  around a stored foreground voxel.
* :class:`PatchBatchStream` is an endless (or finite) ``IterableDataset`` of ready batches; every batch is a
  pure function of ``(seed, rank, batch_index)``, so the stream is reproducible, identical for any number of
  DataLoader workers, and can be resumed mid-training with ``start_batch``.
* :func:`make_patch_loader` wraps it in a :class:`PatchLoader` (a ``torch.utils.data.DataLoader`` with
  persistent background workers, plus ``set_epoch``).

Batches: ``{"data": float32 (B, C, *patch), "seg": int64 (B, 1, *patch), "keys": [case names]}``;
``seg`` holds labels ``0..K`` (the ``-1`` "outside the image" marker is mapped to 0 after augmentation).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from light_training.io import load_case, load_case_properties

__all__ = ["CaseDataset", "list_case_files", "patch_start_bounds", "choose_patch_start", "crop_with_padding",
           "sample_patch", "PatchBatchStream", "PatchLoader", "make_patch_loader", "is_forced_foreground"]


def list_case_files(folder: str | os.PathLike, names: Sequence[str] | None = None) -> list[str]:
    """Paths of ``folder/NAME.npz``: all cases (sorted) or exactly ``names`` (error listing any missing)."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: preprocessed data directory not found")
    if names is None:
        return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                      if f.endswith(".npz") and not f.startswith("."))
    paths = [os.path.join(folder, f"{n}.npz") for n in names]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{folder}: {len(missing)} preprocessed case(s) missing: "
                                f"{[os.path.basename(p) for p in missing[:10]]}")
    return paths


class CaseDataset(Dataset):
    """Preprocessed cases, loaded on access.

    ``dataset[i]`` is ``{"data": float32 (C, Z, Y, X), "seg": int (1, Z, Y, X) or None, "properties": dict,
    "key": name}`` (numpy arrays). Properties and class locations are cached after first use; with
    ``cache_arrays=True`` the decompressed arrays are kept too (memory grows with the number of cases read,
    separately in every DataLoader worker process).
    """

    def __init__(self, npz_paths: Sequence[str | os.PathLike], cache_arrays: bool = False, load_seg: bool = True):
        self.paths = [os.fspath(p) for p in npz_paths]
        if not self.paths:
            raise ValueError("CaseDataset: no cases given")
        missing = [p for p in self.paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"CaseDataset: {len(missing)} case file(s) not found: {missing[:5]}")
        self.keys = [os.path.basename(p)[:-len(".npz")] for p in self.paths]
        self.cache_arrays = cache_arrays
        self.load_seg = load_seg
        self._array_cache: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
        self._properties: dict[int, dict[str, Any]] = {}
        self._class_locations: dict[int, dict[int, np.ndarray]] = {}

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, names: Sequence[str] | None = None, **kwargs) -> "CaseDataset":
        return cls(list_case_files(folder, names), **kwargs)

    def __len__(self) -> int:
        return len(self.paths)

    def arrays(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """``(data (C, Z, Y, X) float32, seg (1, Z, Y, X) or None)`` of case ``index``."""
        if index in self._array_cache:
            return self._array_cache[index]
        data, seg, _ = load_case(self.paths[index], load_seg=self.load_seg, load_properties=False)
        if self.cache_arrays:
            self._array_cache[index] = (data, seg)
        return data, seg

    def properties(self, index: int) -> dict[str, Any]:
        if index not in self._properties:
            self._properties[index] = load_case_properties(self.paths[index])
        return self._properties[index]

    def class_locations(self, index: int) -> dict[int, np.ndarray]:
        """Stored foreground voxels per label: ``{label: int32 array (N, 3) of (z, y, x)}`` (empty labels dropped)."""
        if index not in self._class_locations:
            raw = self.properties(index).get("class_locations") or {}
            locations = {}
            for label, coords in raw.items():
                coords = np.asarray(coords, dtype=np.int32).reshape(-1, 3) if len(coords) else np.zeros((0, 3), np.int32)
                if len(coords):
                    locations[int(label)] = coords
            self._class_locations[index] = locations
        return self._class_locations[index]

    def __getitem__(self, index: int) -> dict[str, Any]:
        data, seg = self.arrays(index)
        return {"data": data, "seg": seg, "properties": self.properties(index), "key": self.keys[index]}


# ------------------------------------------------------------------------------------------- patch geometry

def patch_start_bounds(shape: Sequence[int], patch_size: Sequence[int]) -> tuple[list[int], list[int]]:
    """Inclusive range ``[lb, ub]`` of patch start positions per axis.

    When an axis is shorter than the patch, the patch may start before 0 by half of the missing length
    (rounded down), so the case ends up roughly centred; otherwise ``lb = 0`` and ``ub = shape - patch``.
    """
    lower, upper = [], []
    for size, patch in zip(shape, patch_size):
        need = max(0, patch - size)
        lower.append(-(need // 2))
        upper.append(size + need // 2 + need % 2 - patch)
    return lower, upper


def choose_patch_start(shape: Sequence[int], patch_size: Sequence[int], rng: np.random.Generator,
                       foreground_voxel: Sequence[int] | None = None) -> tuple[int, ...]:
    """Start corner of a patch inside ``shape`` (may be negative / overhang: the rest is padded).

    Without ``foreground_voxel``: uniform over the bounds of :func:`patch_start_bounds`. With it: the patch is
    centred on the voxel and clamped to those bounds, which keeps the voxel inside the patch.
    """
    lower, upper = patch_start_bounds(shape, patch_size)
    if foreground_voxel is None:
        return tuple(int(rng.integers(lo, hi + 1)) for lo, hi in zip(lower, upper))
    return tuple(int(min(hi, max(lo, v - p // 2)))
                 for v, p, lo, hi in zip(foreground_voxel, patch_size, lower, upper))


def crop_with_padding(array: np.ndarray, start: Sequence[int], patch_size: Sequence[int],
                      pad_value: float) -> np.ndarray:
    """Cut ``array[:, start:start+patch]`` (leading channel axis kept), padding outside parts with ``pad_value``.

    Args:
        array: ``(C, *spatial)``.
        start: patch corner per spatial axis (may be negative or overhang the end).
    Returns:
        ``(C, *patch_size)`` array of ``array``'s dtype.
    """
    spatial = array.shape[1:]
    out = np.full((array.shape[0], *patch_size), pad_value, dtype=array.dtype)
    source, target = [slice(None)], [slice(None)]
    for s, p, size in zip(start, patch_size, spatial):
        lo, hi = max(s, 0), min(s + p, size)
        if hi <= lo:  # patch entirely outside on this axis: all padding
            return out
        source.append(slice(lo, hi))
        target.append(slice(lo - s, hi - s))
    out[tuple(target)] = array[tuple(source)]
    return out


def sample_patch(data: np.ndarray, seg: np.ndarray, patch_size: Sequence[int], rng: np.random.Generator,
                 class_locations: dict[int, np.ndarray] | None = None,
                 force_foreground: bool = False) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """Cut one training patch.

    With ``force_foreground`` and stored locations, a label is drawn uniformly among the labels that have
    locations, then one of its stored voxels; the patch contains that voxel. Otherwise the placement is random.
    Data are padded with 0 and seg with -1 ("outside the image").

    Returns ``(data (C, *patch), seg (1, *patch), start)``.
    """
    voxel = None
    if force_foreground and class_locations:
        labels = sorted(class_locations)
        coords = class_locations[labels[int(rng.integers(len(labels)))]]
        voxel = coords[int(rng.integers(len(coords)))]
    start = choose_patch_start(data.shape[1:], patch_size, rng, voxel)
    return (crop_with_padding(data, start, patch_size, 0.0),
            crop_with_padding(seg, start, patch_size, -1), start)


def is_forced_foreground(sample_index: int, batch_size: int, oversample_foreground: float) -> bool:
    """nnU-Net's deterministic rule: the last ``round(batch_size * p)`` samples of a batch are forced.

    (sample j is forced iff ``j >= round(batch_size * (1 - p))``; batch 2 with p=0.33 forces sample 1.)
    """
    return sample_index >= round(batch_size * (1.0 - oversample_foreground))


# ----------------------------------------------------------------------------------------- batch stream

def _to_tensor(value: Any) -> torch.Tensor:
    if hasattr(value, "as_tensor"):  # MONAI MetaTensor -> plain tensor (no metadata in batches)
        value = value.as_tensor()
    return torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)


class PatchBatchStream(IterableDataset):
    """Batches of random patches, reproducible per batch index.

    Batch ``g`` is drawn with ``np.random.default_rng([seed, rank, g])`` (cases with replacement, patch
    placement, augmentation seed), so the sequence does not depend on the number of workers and a resumed
    run continues the same sequence with ``start_batch = iterations_done``.

    Args:
        dataset: :class:`CaseDataset` with segmentations.
        patch_size: ``(Z, Y, X)`` patch size.
        batch_size: samples per batch.
        oversample_foreground: fraction of each batch forced to contain foreground (rule of
            :func:`is_forced_foreground`).
        transform: called on ``{"data": float32 (C, *patch), "seg": float32 (1, *patch)}`` per sample and
            returning the same keys (arrays or tensors); if it has ``set_random_state`` it is re-seeded for
            each sample from the batch generator (MONAI ``Compose`` has it).
        seed, rank: stream identity (use a different rank per DDP process).
        start_batch: index of the first batch produced.
        num_batches: number of batches, or None for an endless stream.
    """

    def __init__(self, dataset: CaseDataset, patch_size: Sequence[int], batch_size: int,
                 oversample_foreground: float = 0.33, transform: Callable[[dict], dict] | None = None,
                 seed: int = 0, rank: int = 0, start_batch: int = 0, num_batches: int | None = None):
        super().__init__()
        if len(patch_size) != 3 or any(int(p) <= 0 for p in patch_size):
            raise ValueError(f"patch_size must be three positive ints (Z, Y, X), got {patch_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= oversample_foreground <= 1.0:
            raise ValueError(f"oversample_foreground must be in [0, 1], got {oversample_foreground}")
        self.dataset = dataset
        self.patch_size = tuple(int(p) for p in patch_size)
        self.batch_size = int(batch_size)
        self.oversample_foreground = float(oversample_foreground)
        self.transform = transform
        self.seed, self.rank = int(seed), int(rank)
        # Shared memory: DataLoader workers (persistent, forked or spawned) see updates made by set_start_batch.
        self._start_batch = torch.tensor(int(start_batch), dtype=torch.int64).share_memory_()
        self.num_batches = num_batches

    @property
    def start_batch(self) -> int:
        return int(self._start_batch.item())

    def set_start_batch(self, start_batch: int) -> None:
        """Make the next iteration start at global batch ``start_batch`` (takes effect in running workers)."""
        self._start_batch.fill_(int(start_batch))

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("endless PatchBatchStream has no length")
        return int(self.num_batches)

    def make_batch(self, batch_index: int) -> dict[str, Any]:
        """The batch with global index ``batch_index`` (same result every time)."""
        rng = np.random.default_rng([self.seed, self.rank, int(batch_index)])
        case_indices = rng.integers(len(self.dataset), size=self.batch_size)
        datas, segs, keys = [], [], []
        for j, case_index in enumerate(case_indices):
            case_index = int(case_index)
            data, seg = self.dataset.arrays(case_index)
            if seg is None:
                raise ValueError(f"{self.dataset.paths[case_index]}: no 'seg' array; training patches need labels")
            force = is_forced_foreground(j, self.batch_size, self.oversample_foreground)
            locations = self.dataset.class_locations(case_index) if force else None
            data_patch, seg_patch, _ = sample_patch(data, seg, self.patch_size, rng, locations, force)
            sample = {"data": data_patch.astype(np.float32, copy=False), "seg": seg_patch.astype(np.float32)}
            if self.transform is not None:
                if hasattr(self.transform, "set_random_state"):
                    self.transform.set_random_state(seed=int(rng.integers(2**31 - 1)))
                sample = self.transform(sample)
            data_tensor = _to_tensor(sample["data"]).float()
            seg_tensor = torch.round(_to_tensor(sample["seg"]).float()).long()
            seg_tensor[seg_tensor < 0] = 0  # -1 marks "outside the image": background for the loss
            datas.append(data_tensor)
            segs.append(seg_tensor)
            keys.append(self.dataset.keys[case_index])
        return {"data": torch.stack(datas).contiguous(), "seg": torch.stack(segs).contiguous(), "keys": keys}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # Worker w makes batches w, w+W, ...; the DataLoader returns workers' outputs round-robin,
        # which restores the global order 0, 1, 2, ...
        first = self.start_batch
        batch_index = first + worker_id
        end = None if self.num_batches is None else first + int(self.num_batches)
        while end is None or batch_index < end:
            yield self.make_batch(batch_index)
            batch_index += num_workers


def _init_loader_worker(worker_id: int) -> None:
    # One intra-op thread per worker: several workers each using all cores would oversubscribe the CPU.
    torch.set_num_threads(1)
    np.random.seed((torch.initial_seed() + worker_id) % 2**32)


class PatchLoader:
    """Iterable of patch batches with background workers and epochs (what the trainer consumes).

    ``iter(loader)`` yields ``num_batches`` batches (endless when None) starting at global batch
    ``start_batch``; after ``set_epoch(e)`` the next iteration yields batches ``e * num_batches`` onwards, so
    every epoch gets new patches and a run resumed at epoch ``e`` sees exactly the batches of an uninterrupted
    run. The output never depends on ``num_workers``.
    """

    def __init__(self, stream: PatchBatchStream, num_workers: int = 0, pin_memory: bool = False,
                 prefetch_factor: int = 2):
        self.stream = stream
        self.num_workers = int(num_workers)
        extra: dict[str, Any] = {}
        if self.num_workers > 0:
            extra = {"worker_init_fn": _init_loader_worker, "persistent_workers": True,
                     "prefetch_factor": prefetch_factor}
        self.loader = DataLoader(stream, batch_size=None, num_workers=self.num_workers, pin_memory=pin_memory,
                                 **extra)

    def set_epoch(self, epoch: int) -> None:
        if self.stream.num_batches is None:
            raise ValueError("set_epoch needs a loader with num_batches (batches per epoch)")
        self.stream.set_start_batch(int(epoch) * int(self.stream.num_batches))

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.loader)


def make_patch_loader(dataset: CaseDataset, patch_size: Sequence[int], batch_size: int, *,
                      oversample_foreground: float = 0.33, transform: Callable[[dict], dict] | None = None,
                      num_workers: int = 0, seed: int = 0, rank: int = 0, start_batch: int = 0,
                      num_batches: int | None = None, pin_memory: bool = False,
                      prefetch_factor: int = 2) -> PatchLoader:
    """A :class:`PatchLoader` over :class:`PatchBatchStream` (batches are made whole inside the workers).

    Iterating it yields the batches ``start_batch, start_batch + 1, ...`` in order, identical for every
    ``num_workers``; ``num_batches`` is the number of batches per iteration (= per epoch with ``set_epoch``).
    Use ``num_workers=0`` for tests and debugging (everything in the calling process).
    """
    stream = PatchBatchStream(dataset, patch_size, batch_size, oversample_foreground=oversample_foreground,
                              transform=transform, seed=seed, rank=rank, start_batch=start_batch,
                              num_batches=num_batches)
    return PatchLoader(stream, num_workers=num_workers, pin_memory=pin_memory, prefetch_factor=prefetch_factor)
