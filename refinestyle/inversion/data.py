"""Image folders for training and evaluating the inverters.

`ImageFolderDataset` reads any folder of jpg/png images, resizes them to one size
(a square, or height x width: 192 x 256 for Stanford Cars) and flips them horizontally at random. The flip is a pure function of
(seed, epoch, index), never of a global random state, so a run resumed in the
middle of an epoch (or a run with several data-loader workers, or several
processes) sees exactly the images an uninterrupted run would see.

`ResumableDistributedSampler` is torch's DistributedSampler with one addition:
it can start an epoch part-way through, so a resumed run skips the batches it
already trained on without loading them.

A file that is not a readable image raises `UnreadableImageError` (a ValueError) naming
it, when it is read: with or without DataLoader worker processes, the same one-line message.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import Dataset, DistributedSampler

from refinestyle.imageio import image_size_hw, list_images, load_image


class UnreadableImageError(ValueError):
    """A file of an image folder that PIL cannot read; the message names the file and PIL's reason.

    A DataLoader worker's exception comes back to the main process as `type(error)(text)`, the text
    being "Caught UnreadableImageError in DataLoader worker process N." and the worker's whole
    traceback. This class keeps the original message, the traceback's last line, so the error
    reads the same with and without workers; the traceback stays in the exception's notes.
    """

    def __init__(self, message: str):
        name = type(self).__name__
        if message.startswith(f"Caught {name} ") and f"{name}: " in message:
            worker_traceback, message = message, message.rsplit(f"{name}: ", 1)[1].strip()
            super().__init__(message)
            if hasattr(self, "add_note"):  # Python 3.11+
                self.add_note(worker_traceback)
        else:
            super().__init__(message)


class ImageFolderDataset(Dataset):
    """Every image file under a folder (recursively), as [3, height, width] float tensors in [-1, 1].

    Args:
        root: a folder of images (png, jpg, jpeg, bmp, webp; searched recursively) or one image file.
        size: what the images are resized to (bicubic), in pixels: an int side (a square) or
            (height, width), e.g. (192, 256) for Stanford Cars as pSp reads them.
        hflip: flip each image horizontally with probability 1/2 (training augmentation).
        seed: seed of the flip decisions; the decision for an image is a function of
            (seed, epoch, index) only. Call `set_epoch` every epoch for fresh flips.

    Items are float32 tensors [3, height, width] with values in [-1, 1]; `size` is (height, width).
    Raises FileNotFoundError for a missing folder and ValueError for a folder without images;
    reading an item that is not a readable image raises UnreadableImageError (a ValueError).
    """

    def __init__(self, root: str | Path, size: int | tuple[int, int] = 256, *, hflip: bool = False, seed: int = 0):
        self.size = image_size_hw(size, "size")
        self.root = Path(root)
        self.paths = list_images(self.root)
        self.hflip = bool(hflip)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the flips of `epoch` (the same epoch always gives the same flips)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.paths)

    def is_flipped(self, index: int) -> bool:
        """Whether item `index` is flipped in the current epoch (deterministic, see the class docs)."""
        if not self.hflip:
            return False
        key = f"{self.seed}:{self.epoch}:{index}".encode()
        return hashlib.blake2b(key, digest_size=1).digest()[0] & 1 == 1

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.paths[index]
        try:
            image = load_image(path, self.size)[0]
        except (FileNotFoundError, ValueError) as error:  # unreadable, or gone since the folder was listed
            raise UnreadableImageError(str(error)) from error
        if self.is_flipped(index):
            image = image.flip(-1)
        return image.contiguous()


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler that can begin an epoch after its first `start_batch` batches.

    The order of an epoch depends only on (seed, epoch), as in DistributedSampler; with
    `set_epoch(epoch, start_batch=k)` the iterator skips this rank's first k * batch_size
    indices of that epoch. Works with one process too (num_replicas=1, rank=0).

    Args:
        dataset: the dataset to sample from.
        batch_size: per-process batch size (needed to turn a batch count into indices).
        num_replicas, rank: the process group layout; default from torch.distributed when
            it is initialised, else 1 and 0.
        shuffle, seed, drop_last: as in DistributedSampler.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        num_replicas: int | None = None,
        rank: int | None = None,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
    ):
        if num_replicas is None and not torch.distributed.is_initialized():
            num_replicas, rank = 1, 0
        super().__init__(dataset, num_replicas, rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        if batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size}")
        self.batch_size = batch_size
        self.start_batch = 0

    def batches_per_epoch(self) -> int:
        """Full batches this rank draws per epoch (a last partial batch is dropped by the loader)."""
        return self.num_samples // self.batch_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the order of `epoch` and skip its first `start_batch` batches."""
        super().set_epoch(epoch)
        if start_batch < 0:
            raise ValueError(f"start_batch: expected >= 0, got {start_batch}")
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start_batch * self.batch_size :])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start_batch * self.batch_size)
