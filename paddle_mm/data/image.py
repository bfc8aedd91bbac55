"""Image loading and preprocessing to normalized float32 CHW arrays, as transformers' PIL image
processors compute it: optional pad to a square (LLaVA-1.5), resize (shortest edge, then a centre
crop; or exact), rescale, normalize. A checkpoint folder's settings are read by
`image_config_from_folder`: preprocessor_config.json (transformers 4.x) or the "image_processor"
entry of processor_config.json (5.x)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, Sequence, Union

import numpy as np
from PIL import Image

from paddle_mm.errors import DataError, ImageTooLargeError
from paddle_mm.fileio import read_json_object

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
_RESAMPLE_BY_CODE = {int(v): k for k, v in _RESAMPLE.items()}  # PIL's codes, as preprocessor configs store them


def resample_name(value, source: str) -> str:
    """A filter's name ("bicubic") from its name or the PIL code a preprocessor config stores (3)."""
    if isinstance(value, str) and value in _RESAMPLE:
        return value
    if not isinstance(value, bool) and value in _RESAMPLE_BY_CODE:
        return _RESAMPLE_BY_CODE[value]
    raise DataError(source, f"resample {value!r} is not a PIL filter name or code")


def pil_filter(name: str):
    return _RESAMPLE[name]


def normalized_hwc(image: Image.Image, rescale_factor: float, mean, std, normalize: bool = True) -> np.ndarray:
    """An RGB picture as float32 HWC: rescaled in float64 and narrowed, then (x - mean) / std in
    float32, the order and precision of transformers' rescale and normalize."""
    arr = (np.asarray(image, dtype=np.float64) * rescale_factor).astype(np.float32)
    if normalize:
        arr = (arr - np.asarray(mean, np.float32).reshape(1, 1, 3)) / np.asarray(std, np.float32).reshape(1, 1, 3)
    return arr


@dataclass
class ImageProcessorConfig:
    size: int = 224  # output is size x size
    # shortest: scale the shorter side to shortest_edge (0: size), then a centre crop of size x size
    resize: Literal["shortest", "exact"] = "shortest"
    shortest_edge: int = 0
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)  # CLIP defaults
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    resample: Literal["bicubic", "bilinear", "nearest", "lanczos", "box", "hamming"] = "bicubic"
    # LLaVA-1.5 pads to a square before resizing, with the mean colour (mean * 255, truncated) by default
    pad_to_square: bool = False
    pad_color: list[int] = field(default_factory=list)
    rescale_factor: float = 1 / 255
    normalize: bool = True
    # model.family qwen2_vl: images keep their size, smart-resized to multiples of 28 with an area
    # in [min_pixels, max_pixels] (0: Qwen2-VL's 56 * 56 and 28 * 28 * 1280); size and resize unused
    min_pixels: int = 0
    max_pixels: int = 0

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
        if self.shortest_edge and self.shortest_edge < self.size:
            raise ValueError(f"shortest_edge {self.shortest_edge} is smaller than the crop size {self.size}")
        self.pad_color = [int(c) for c in self.pad_color]
        if self.pad_color and len(self.pad_color) != 3:
            raise ValueError("pad_color must have 3 values (R, G, B)")

    def fill(self) -> tuple[int, int, int]:
        return tuple(self.pad_color) if self.pad_color else tuple(int(m * 255) for m in self.mean)


def _size_of(value, key: str, source: str) -> int:
    """A square size from a processor config's {"height", "width"}, {"shortest_edge"} or int."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        if key in value:
            return int(value[key])
        if "height" in value and "width" in value:
            if value["height"] != value["width"]:
                raise DataError(source, f"a non-square size {value} is not supported")
            return int(value["height"])
    raise DataError(source, f"cannot read the size {value!r}")


# The image processors whose preprocessing the fields above express.
_KNOWN_PROCESSORS = ("CLIPImageProcessor", "LlavaImageProcessor", "BlipImageProcessor", "SiglipImageProcessor")


def image_config_from_folder(folder: str) -> ImageProcessorConfig | None:
    """The image processor settings a checkpoint folder ships, or None when it has none."""
    raw, source = None, ""
    path = os.path.join(folder, "preprocessor_config.json")
    if os.path.isfile(path):
        raw, source = _read_json(path), path
    else:
        path = os.path.join(folder, "processor_config.json")
        nested = _read_json(path).get("image_processor") if os.path.isfile(path) else None
        if isinstance(nested, dict):
            raw, source = nested, path
    if raw is None:
        return None
    kind = str(raw.get("image_processor_type", ""))
    base = kind.removesuffix("Fast").removesuffix("Pil")
    if base not in _KNOWN_PROCESSORS:
        raise DataError(source, f"image processor {kind!r} is not supported (one of {_KNOWN_PROCESSORS})")
    if not raw.get("do_resize", True):
        raise DataError(source, "do_resize false is not supported (the model needs a fixed size)")
    size = raw.get("size", 224)
    cropped = raw.get("do_center_crop", False)
    if isinstance(size, dict) and "shortest_edge" in size:
        if not cropped:
            raise DataError(source, "a shortest-edge resize without a centre crop gives non-square images")
        shortest = _size_of(size, "shortest_edge", source)
        crop = _size_of(raw.get("crop_size", shortest), "shortest_edge", source)
        resize = "shortest"
    else:
        if cropped and _size_of(raw.get("crop_size", size), "shortest_edge", source) != _size_of(size, "", source):
            raise DataError(source, "a centre crop after an exact resize is not supported")
        shortest, crop, resize = 0, _size_of(size, "", source), "exact"
    resample = resample_name(raw.get("resample", 3), source)
    normalize = bool(raw.get("do_normalize", True))
    try:
        return ImageProcessorConfig(
            size=crop, resize=resize, shortest_edge=shortest if shortest != crop else 0,
            mean=tuple(raw.get("image_mean", ImageProcessorConfig.mean)),
            std=tuple(raw.get("image_std", ImageProcessorConfig.std)),
            resample=resample, pad_to_square=bool(raw.get("do_pad", False)) and base == "LlavaImageProcessor",
            rescale_factor=float(raw.get("rescale_factor", 1 / 255)) if raw.get("do_rescale", True) else 1.0,
            normalize=normalize,
        )
    except (TypeError, ValueError) as e:
        raise DataError(source, f"cannot read the image processor settings: {e}") from None


def _read_json(path: str) -> dict:
    return read_json_object(path, lambda reason: DataError(path, reason))


ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]

# The formats a user means by "an image" (GIF: its first frame). Pillow knows dozens more, and
# some are not safe to open from strangers: EPS runs Ghostscript where it is installed, and the
# rarer decoders are the least exercised code. This is the one place images are decoded.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")


def open_image(fp, source: str, max_pixels: int = 0) -> Image.Image:
    """Decode a path or binary file object fully as RGB; a DataError naming `source` if it is not
    a readable image of IMAGE_FORMATS, an ImageTooLargeError if it has more than max_pixels (0: no
    limit beyond Pillow's own bomb check).

    The size is checked from the header, before the pixels are decoded.
    """
    try:
        with Image.open(fp, formats=IMAGE_FORMATS) as img:
            w, h = img.size
            if max_pixels and w * h > max_pixels:
                raise ImageTooLargeError(source, f"{w}x{h} pixels is more than the limit of {max_pixels}")
            img.load()  # force the full decode so truncated files fail here
            return img.convert("RGB")
    except ImageTooLargeError:
        raise
    except Image.UnidentifiedImageError:
        raise DataError(source, f"cannot read image: not a {', '.join(IMAGE_FORMATS)} file",
                        reason="image_unreadable") from None
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(source, str(exc)) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(source, f"cannot read image: {exc}", reason="image_unreadable") from None


def load_image(path) -> Image.Image:
    """Open and fully decode ``path`` as RGB; a DataError naming the path if that fails."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(path, "cannot read image: file not found", reason="image_missing")
    return open_image(path, path)


class ImageProcessor:
    """Loads images and turns them into normalized ``[3, size, size]`` float32 arrays."""

    def __init__(self, config: ImageProcessorConfig | None = None):
        self.config = config or ImageProcessorConfig()

    def load(self, path) -> Image.Image:
        return load_image(path)

    def _resize(self, image: Image.Image) -> Image.Image:
        size = self.config.size
        w, h = image.size
        if (w, h) == (size, size) and self.config.shortest_edge in (0, size):
            return image  # fast path: already at model size
        resample = _RESAMPLE[self.config.resample]
        if self.config.resize == "exact":
            return image.resize((size, size), resample)
        # transformers' shortest-edge rule: the short side becomes the edge, the long one is truncated
        edge = self.config.shortest_edge or size
        short, long = min(w, h), max(w, h)
        new_long = int(edge * long / short)
        nw, nh = (edge, new_long) if w <= h else (new_long, edge)
        if (nw, nh) != (w, h):
            image = image.resize((nw, nh), resample)
        left, top = (nw - size) // 2, (nh - size) // 2
        return image.crop((left, top, left + size, top + size))

    def _pad(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        if w == h:
            return image
        side = max(w, h)
        square = Image.new("RGB", (side, side), self.config.fill())
        square.paste(image, ((side - w) // 2, (side - h) // 2))
        return square

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """RGB image -> float32 ``[3, size, size]``: pad, resize, rescale, (x - mean) / std, CHW."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        if self.config.pad_to_square:
            image = self._pad(image)
        c = self.config
        arr = normalized_hwc(self._resize(image), c.rescale_factor, c.mean, c.std, c.normalize)
        return np.ascontiguousarray(arr.transpose(2, 0, 1))

    def __call__(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Paths, PIL images or arrays preprocess() made (the server keeps a waiting request's
        images so, at the model's size) -> float32 ``[N, 3, size, size]``."""
        arrays = [self._prepared(im) if isinstance(im, np.ndarray)
                  else self.preprocess(im if isinstance(im, Image.Image) else self.load(im)) for im in images]
        if not arrays:
            return np.zeros((0, 3, self.config.size, self.config.size), dtype=np.float32)
        return np.stack(arrays)

    def _prepared(self, array: np.ndarray) -> np.ndarray:
        size = self.config.size
        if array.shape != (3, size, size) or array.dtype != np.float32:
            raise ValueError(f"an image array must be what preprocess() returns, float32 [3, {size}, {size}]; "
                             f"got {array.dtype} {list(array.shape)}")
        return array

    def blank(self) -> np.ndarray:
        """The normalized form of a uniform mean-colour picture: all zeros, ``[3, size, size]``.

        Used as the image of the "blind" baseline (the model sees no visual information).
        """
        size = self.config.size
        return np.zeros((3, size, size), dtype=np.float32)
