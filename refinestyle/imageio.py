"""Image files and grids: the one place that converts between tensors and pictures.

Tensors are float images in [-1, 1] with shape [B, 3, H, W] (the generator's
output range); files are 8-bit RGB PNG/JPEG.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from refinestyle.weights import require_file

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] float in [-1, 1] (any device/dtype) -> uint8 array [B, H, W, 3]."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected [B, 3, H, W], got {tuple(images.shape)}")
    array = ((as_saved(images.detach()) + 1) * 127.5).round().to(torch.uint8)  # exact: as_saved's levels
    return array.permute(0, 2, 3, 1).cpu().numpy()


def as_saved(images: torch.Tensor) -> torch.Tensor:
    """What saving float images to an 8-bit file and reading them back gives, as float32 in [-1, 1].

    images: [B, 3, H, W] (or any shape) float, the generator's output, which overshoots [-1, 1].
    Clamped to [-1, 1] and rounded to the 256 levels of a PNG. Published inversion and FID
    numbers (pSp, HyperStyle, pytorch-fid) are measured on saved files, so ours are too.
    """
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile [B, 3, H, W] images in [-1, 1] into one uint8 [H', W', 3] array, `nrow` images per row."""
    pixels = to_uint8(images)
    count, height, width, _ = pixels.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(count))))
    if nrow < 1:
        raise ValueError(f"nrow: expected a positive integer, got {nrow}")
    ncol = int(math.ceil(count / nrow))
    grid = np.full(
        (ncol * (height + padding) + padding, nrow * (width + padding) + padding, 3), 255, np.uint8
    )
    for index in range(count):
        row, col = divmod(index, nrow)
        top, left = padding + row * (height + padding), padding + col * (width + padding)
        grid[top : top + height, left : left + width] = pixels[index]
    return grid


def save_image(image: torch.Tensor, path: str | Path) -> None:
    """Write one image, [3, H, W] or [1, 3, H, W] in [-1, 1], to `path` (format from the suffix)."""
    if image.ndim == 3:
        image = image[None]
    if image.shape[0] != 1:
        raise ValueError(f"image: expected one image [3, H, W] or [1, 3, H, W], got {tuple(image.shape)}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(image)[0]).save(path)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> None:
    """Write [B, 3, H, W] images in [-1, 1] to `path` as one grid picture, `nrow` per row."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(make_grid(images, nrow)).save(path)


def load_image(path: str | Path, size: int | None = None) -> torch.Tensor:
    """Read an image file as a [1, 3, size, size] float tensor in [-1, 1].

    size: resize (bicubic) to size x size when given; otherwise keep the file's size.
    Raises FileNotFoundError for a missing file and ValueError for a file that is not an image.
    """
    path = Path(path)
    require_file(path, "image file")
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if size is not None:
                img = img.resize((size, size), Image.BICUBIC)
            array = np.asarray(img, dtype=np.float32).copy()
    except (OSError, SyntaxError) as error:  # PIL raises these for unreadable or truncated files
        raise ValueError(f"{path} is not a readable image: {error}") from error
    return torch.from_numpy(array).permute(2, 0, 1)[None] / 127.5 - 1


def list_images(path: str | Path) -> list[Path]:
    """The image files in a folder (recursively, sorted), or [path] for a single image file."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no image file or folder at {path}")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files
