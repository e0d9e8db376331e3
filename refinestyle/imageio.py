"""Image files and grids: the one place that converts between tensors and pictures.

Tensors are float images in [-1, 1] with shape [B, 3, H, W] (the generator's
output range); files are 8-bit RGB PNG/JPEG.

Image sizes are (height, width) in pixels; an int n means a square, (n, n). A domain whose
pictures are not square (Stanford Cars: 3:4, read at 192 x 256 by pSp, e4e, HyperStyle and
Style Transformer) is rendered by StyleGAN2 on a square canvas with the picture in its
middle rows (LSUN Cars' 512 x 384 letterboxed into 512 x 512); `crop_canvas` cuts it out.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from refinestyle.weights import require_file

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def image_size_hw(size, name: str = "size") -> tuple[int, int]:
    """(height, width) of `size`: a positive int n (a square, (n, n)) or a pair (height, width).

    Raises TypeError for anything else and ValueError for sizes below 1, naming `name`.
    """
    if isinstance(size, bool) or not isinstance(size, (int, tuple, list)):
        raise TypeError(f"{name}: expected an int or (height, width), got {size!r}")
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise TypeError(f"{name}: expected an int or (height, width) of two ints, got {size!r}")
    if min(pair) < 1:
        raise ValueError(f"{name}: expected positive sizes, got {size!r}")
    return pair


def same_aspect(size, other) -> bool:
    """Whether two sizes (ints or (height, width)) have the same aspect ratio: (192, 256) and (384, 512) do."""
    (height, width), (other_height, other_width) = image_size_hw(size), image_size_hw(other, "other")
    return height * other_width == width * other_height


def parse_image_size(text: str) -> tuple[int, int]:
    """(height, width) of "256" (a square) or "192x256" (height x width, as pSp's Resize((192, 256)))."""
    parts = text.lower().replace("\u00d7", "x").split("x")
    try:
        values = [int(part) for part in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) < 1:
        raise ValueError(f"expected a size in pixels, N or HEIGHTxWIDTH (e.g. 256 or 192x256), got {text!r}")
    return image_size_hw(values[0] if len(values) == 1 else tuple(values))


def canvas_box(canvas: int, size) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the picture of aspect `size` (an int or (height, width))
    centred on a square canvas of side `canvas`: all of it for a square `size`, the middle
    rows for a wide one (LSUN / Stanford Cars at 512: rows 64 to 448), the middle columns
    for a tall one. Raises ValueError when the box would not be whole pixels."""
    height, width = image_size_hw(size)
    box_h, box_w = (canvas * height // width, canvas) if height <= width else (canvas, canvas * width // height)
    if not same_aspect((box_h, box_w), (height, width)) or (canvas - box_h) % 2 or (canvas - box_w) % 2:
        raise ValueError(
            f"size: a {height} x {width} picture does not fill whole, centred rows and columns of a "
            f"{canvas} x {canvas} canvas"
        )
    return (canvas - box_h) // 2, (canvas - box_w) // 2, box_h, box_w


def crop_canvas(renders: torch.Tensor, size) -> torch.Tensor:
    """The picture of aspect `size` (an int or (height, width)) in the middle of square renders.

    renders: [B, C, R, R], the generator's output. size: the domain's picture size; only its
    aspect matters. Returns a view [B, C, h, w] with h / w = height / width (the renders
    themselves for a square size). HyperStyle and e4e crop Stanford Cars renders the same way
    (rows 32 to 224 of the 256 px pooled render).
    """
    if renders.ndim != 4 or renders.shape[-1] != renders.shape[-2]:
        raise ValueError(f"renders: expected square renders [B, C, R, R], got {tuple(renders.shape)}")
    top, left, height, width = canvas_box(renders.shape[-1], size)
    if (height, width) == tuple(renders.shape[-2:]):
        return renders
    return renders[:, :, top : top + height, left : left + width]


def pool_or_resize(images: torch.Tensor, size) -> torch.Tensor:
    """[B, C, H, W] pictures at `size` (an int or (height, width)): unchanged when already that size,
    average-pooled when no side grows (as pSp's face_pool brings renders to 256 px), else
    bilinearly resized (antialiased)."""
    height, width = image_size_hw(size)
    if tuple(images.shape[-2:]) == (height, width):
        return images
    if images.shape[-2] >= height and images.shape[-1] >= width:
        return F.adaptive_avg_pool2d(images, (height, width))
    return F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False, antialias=True)


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


def open_rgb(path: str | Path) -> Image.Image:
    """Read an image file as an 8-bit RGB PIL image, upright.

    Applies the EXIF orientation (a portrait phone photo is stored sideways), scales 16- and
    32-bit integer grayscale (PIL's modes I;16 and I, which convert("RGB") would clip at 255,
    turning a 16-bit PNG nearly white) to 8 bits, and drops an alpha channel. A 32-bit file
    (mode I) states no range: its values are read as 8-bit when they all lie in 0 ... 255 (as
    image tools write 8-bit data to 32-bit TIFFs), as 16-bit when they lie in 0 ... 65535, and
    else over 0 ... 2^31 - 1. Raises OSError (PIL's own, for unreadable files) and ValueError
    for floating-point images and negative samples, whose range no file states.
    """
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode == "F":
            raise ValueError(f"{path} holds floating-point pixels (mode F); save it as an 8- or 16-bit image")
        if img.mode.startswith("I"):  # I;16, I;16B, I;16L: 16-bit samples; I: 32-bit, see above
            samples = np.asarray(img).astype(np.float64)
            top = 65535.0
            if img.mode == "I" and samples.size:
                low, high = samples.min(), samples.max()
                if low < 0:
                    raise ValueError(f"{path} holds negative 32-bit samples (down to {low:.0f}); no pixel range fits")
                top = 255.0 if high <= 255 else 65535.0 if high <= 65535 else 2.0**31 - 1
            img = Image.fromarray(np.clip(np.rint(samples * (255.0 / top)), 0, 255).astype(np.uint8), mode="L")
        return img.convert("RGB")


def load_image(path: str | Path, size=None) -> torch.Tensor:
    """Read an image file as a [1, 3, height, width] float tensor in [-1, 1].

    size: resize (bicubic) to an int side (a square) or (height, width) when given; otherwise
        keep the file's size.
    Raises FileNotFoundError for a missing file and ValueError for a file that is not an image.
    """
    path = Path(path)
    hw = None if size is None else image_size_hw(size)
    require_file(path, "image file")
    try:
        img = open_rgb(path)
        if hw is not None and img.size != hw[::-1]:
            img = img.resize(hw[::-1], Image.BICUBIC)
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
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files
