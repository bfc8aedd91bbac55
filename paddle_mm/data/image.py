"""Image loading and CLIP-style preprocessing to normalized float32 CHW arrays."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal, Sequence, Union

import numpy as np
from PIL import Image

from paddle_mm.errors import DataError, ImageTooLargeError

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


@dataclass
class ImageProcessorConfig:
    size: int = 224  # output is size x size
    resize: Literal["shortest", "exact"] = "shortest"  # shortest: scale shorter side, centre crop
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)  # CLIP defaults
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    resample: Literal["bicubic", "bilinear", "nearest"] = "bicubic"

    def __post_init__(self):
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size <= 0:
            raise ValueError(f"size must be a positive int, got {self.size!r}")
        if self.resize not in ("shortest", "exact"):
            raise ValueError(f"resize must be 'shortest' or 'exact', got {self.resize!r}")
        if self.resample not in _RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, got {self.resample!r}")
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std must each have 3 values (R, G, B)")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std values must be positive, got {self.std}")


ImageInput = Union[str, os.PathLike, Image.Image]


def open_image(fp, source: str, max_pixels: int = 0) -> Image.Image:
    """Decode a path or binary file object fully as RGB; a DataError naming `source` if it is not
    a readable image, an ImageTooLargeError if it has more than max_pixels (0: no limit).

    The size is checked from the header, before the pixels are decoded.
    """
    try:
        with Image.open(fp) as img:
            w, h = img.size
            if max_pixels and w * h > max_pixels:
                raise ImageTooLargeError(source, f"{w}x{h} pixels is more than the limit of {max_pixels}")
            img.load()  # force the full decode so truncated files fail here
            return img.convert("RGB")
    except ImageTooLargeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(source, str(exc)) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(source, f"cannot read image: {exc}", reason="image_unreadable") from None


class ImageProcessor:
    """Loads images and turns them into normalized ``[3, size, size]`` float32 arrays."""

    def __init__(self, config: ImageProcessorConfig | None = None):
        self.config = config or ImageProcessorConfig()
        self._mean = np.asarray(self.config.mean, dtype=np.float32).reshape(1, 1, 3)
        self._std = np.asarray(self.config.std, dtype=np.float32).reshape(1, 1, 3)

    def load(self, path) -> Image.Image:
        """Open and fully decode ``path`` as RGB; a DataError naming the path if that fails."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise DataError(path, "cannot read image: file not found", reason="image_missing")
        return open_image(path, path)

    def _resize(self, image: Image.Image) -> Image.Image:
        size = self.config.size
        w, h = image.size
        if (w, h) == (size, size):
            return image  # fast path: already at model size
        resample = _RESAMPLE[self.config.resample]
        if self.config.resize == "exact":
            return image.resize((size, size), resample)
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        if (nw, nh) != (w, h):
            image = image.resize((nw, nh), resample)
        left, top = (nw - size) // 2, (nh - size) // 2
        return image.crop((left, top, left + size, top + size))

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """RGB image -> float32 ``[3, size, size]``: resize, /255, (x - mean) / std, CHW."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        arr = np.asarray(self._resize(image), dtype=np.float32) / 255.0
        arr = (arr - self._mean) / self._std
        return np.ascontiguousarray(arr.transpose(2, 0, 1))

    def __call__(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Paths or PIL images -> float32 ``[N, 3, size, size]``."""
        arrays = [self.preprocess(im if isinstance(im, Image.Image) else self.load(im)) for im in images]
        if not arrays:
            return np.zeros((0, 3, self.config.size, self.config.size), dtype=np.float32)
        return np.stack(arrays)

    def blank(self) -> np.ndarray:
        """The normalized form of a uniform mean-colour picture: all zeros, ``[3, size, size]``.

        Used as the image of the "blind" baseline (the model sees no visual information).
        """
        size = self.config.size
        return np.zeros((3, size, size), dtype=np.float32)
