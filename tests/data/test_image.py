import io

import numpy as np
import pytest
from PIL import Image

from paddle_mm.data.image import ImageProcessor, ImageProcessorConfig
from paddle_mm.errors import DataError

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def test_shape_dtype_and_normalization_of_uniform_image():
    proc = ImageProcessor(ImageProcessorConfig(size=8))
    out = proc.preprocess(Image.new("RGB", (8, 8), (255, 0, 128)))
    assert out.shape == (3, 8, 8) and out.dtype == np.float32
    expected = (np.array([1.0, 0.0, 128 / 255]) - MEAN) / STD
    for c in range(3):
        np.testing.assert_allclose(out[c], expected[c], rtol=1e-6)
    # e.g. channel 0: (1 - 0.48145466) / 0.26862954 = 1.93033...
    assert out[0, 0, 0] == pytest.approx(1.9303361, abs=1e-6)
    assert out[1, 0, 0] == pytest.approx(-1.7520971, abs=1e-6)


def test_custom_mean_std_exact_values():
    proc = ImageProcessor(ImageProcessorConfig(size=4, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 1.0)))
    out = proc.preprocess(Image.new("RGB", (4, 4), (255, 0, 51)))
    assert np.all(out[0] == 1.0) and np.all(out[1] == -2.0)
    np.testing.assert_allclose(out[2], 0.2 - 0.5, rtol=1e-6)


def gradient(w: int, h: int) -> np.ndarray:
    """An h x w RGB image whose pixels say where they are: R = 8x, G = 6y, B = 7."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([8 * x, 6 * y, np.full_like(x, 7)], axis=-1).astype(np.uint8)


def plain(size: int, **kw) -> ImageProcessor:
    """Rescale only (mean 0, std 1): the output is the resized, cropped pixels / 255."""
    return ImageProcessor(ImageProcessorConfig(size=size, mean=(0, 0, 0), std=(1, 1, 1), **kw))


def as_pixels(out: np.ndarray) -> np.ndarray:
    return np.rint(out.transpose(1, 2, 0) * 255).astype(np.int64)


@pytest.mark.parametrize("w, h, size, left, top", [
    (11, 8, 8, 1, 0),   # landscape, an odd difference: (11 - 8) // 2 = 1
    (8, 13, 8, 0, 2),   # portrait: (13 - 8) // 2 = 2
    (12, 9, 9, 1, 0),
    (9, 9, 9, 0, 0),
])
def test_centre_crop_takes_the_middle_pixels_exactly(w, h, size, left, top):
    pixels = gradient(w, h)  # the short side is already the size: a crop, no resize
    out = plain(size).preprocess(Image.fromarray(pixels))
    assert out.shape == (3, size, size) and out.dtype == np.float32
    np.testing.assert_array_equal(as_pixels(out), pixels[top:top + size, left:left + size])


def _box_halved(pixels: np.ndarray) -> np.ndarray:
    """A 2 x 2 box average; the gradient's blocks average to whole numbers, so no rounding."""
    p = pixels.astype(np.int64)
    return (p[0::2, 0::2] + p[1::2, 0::2] + p[0::2, 1::2] + p[1::2, 1::2]) // 4


@pytest.mark.parametrize("w, h, size, edge, left, top", [
    (16, 24, 8, 0, 0, 2),    # short side 16 -> 8, long 24 -> 12, crop rows (12 - 8) // 2 = 2 on
    (24, 16, 8, 0, 2, 0),
    (24, 36, 8, 12, 2, 5),   # shortest_edge 12: 12 x 18, then the central 8 x 8 at (2, 5)
])
def test_shortest_edge_resize_then_centre_crop_pixel_by_pixel(w, h, size, edge, left, top):
    pixels = gradient(w, h)
    out = plain(size, shortest_edge=edge, resample="box").preprocess(Image.fromarray(pixels))
    expected = _box_halved(pixels)[top:top + size, left:left + size]
    assert (expected[..., 0] % 16 == 4).all()  # block means of 8x: 16x' + 4, exact
    np.testing.assert_array_equal(as_pixels(out), expected)


@pytest.mark.parametrize("w, h, size, resized, left, top", [
    (13, 6, 5, (10, 5), 2, 0),   # long side int(5 * 13 / 6) = int(10.83) = 10, not 11
    (7, 31, 6, (6, 26), 0, 10),  # int(6 * 31 / 7) = int(26.57) = 26, crop rows 10 on
])
def test_long_side_is_truncated_as_transformers_does(w, h, size, resized, left, top):
    image = Image.fromarray(gradient(w, h))
    out = plain(size, resample="nearest").preprocess(image)
    expected = np.asarray(image.resize(resized, Image.Resampling.NEAREST))[top:top + size, left:left + size]
    np.testing.assert_array_equal(as_pixels(out), expected)
    rounded = tuple(round(v * size / min(w, h)) for v in (w, h))  # the rule it must not follow
    other = np.asarray(image.resize(rounded, Image.Resampling.NEAREST))
    oleft, otop = (rounded[0] - size) // 2, (rounded[1] - size) // 2
    assert not np.array_equal(expected, other[otop:otop + size, oleft:oleft + size])  # the case tells them apart


def test_exact_resize_squashes_without_a_crop():
    pixels = gradient(16, 24)
    out = plain(8, resize="exact", resample="box").preprocess(Image.fromarray(pixels))
    p = pixels.astype(np.int64)  # box: 2 columns x 3 rows per output pixel
    expected = sum(p[r::3, c::2] for r in range(3) for c in range(2)) / 6
    np.testing.assert_array_equal(as_pixels(out), expected)  # whole numbers: 8x + 4, 18y + 6, 7


def test_pad_to_square_centres_the_image_on_the_fill_colour():
    pixels = gradient(4, 2)
    proc = plain(4, pad_to_square=True, pad_color=[1, 2, 3])
    out = as_pixels(proc.preprocess(Image.fromarray(pixels)))
    np.testing.assert_array_equal(out[1:3], pixels)  # (4 - 2) // 2 = 1 row above
    assert (out[[0, 3]] == [1, 2, 3]).all()


def test_fast_path_keeps_pixels():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)
    proc = ImageProcessor(ImageProcessorConfig(size=5, mean=(0, 0, 0), std=(1, 1, 1)))
    out = proc.preprocess(Image.fromarray(pixels))
    np.testing.assert_allclose(out, pixels.transpose(2, 0, 1) / 255.0, rtol=1e-6)


def test_call_batches_paths_and_images(tmp_path):
    Image.new("RGB", (16, 16), (10, 20, 30)).save(tmp_path / "a.png")
    Image.new("L", (16, 16), 99).save(tmp_path / "gray.png")
    proc = ImageProcessor(ImageProcessorConfig(size=16))
    batch = proc([tmp_path / "a.png", str(tmp_path / "gray.png"), Image.new("RGBA", (16, 16))])
    assert batch.shape == (3, 3, 16, 16) and batch.dtype == np.float32
    assert proc([]).shape == (0, 3, 16, 16)
    assert proc.load(tmp_path / "gray.png").mode == "RGB"


def test_bad_files_raise_data_error(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "ok.png")  # noise: the cut lands inside the pixel data
    data = (tmp_path / "ok.png").read_bytes()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(data[: len(data) // 2])
    text = tmp_path / "text.png"
    text.write_text("not an image at all")
    proc = ImageProcessor(ImageProcessorConfig(size=8))
    for bad in (truncated, text, tmp_path / "missing.png"):
        with pytest.raises(DataError) as info:
            proc.load(bad)
        assert str(bad) in str(info.value) and "cannot read image" in str(info.value)
    with pytest.raises(DataError, match="truncated.png"):
        proc([tmp_path / "ok.png", truncated])


def test_blank_is_zeros():
    blank = ImageProcessor(ImageProcessorConfig(size=12)).blank()
    assert blank.shape == (3, 12, 12) and blank.dtype == np.float32 and not blank.any()


@pytest.mark.parametrize("kw", [{"size": 0}, {"resize": "crop"}, {"resample": "antialias"},
                                {"std": (1, 0, 1)}, {"mean": (0.5, 0.5)}])
def test_config_validation(kw):
    with pytest.raises(ValueError):
        ImageProcessorConfig(**kw)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGB pixels, with a few bytes of pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_pixel_limit_is_checked_from_the_header_before_decoding(tmp_path):
    from paddle_mm.data.image import open_image
    from paddle_mm.errors import ImageTooLargeError

    data = _png_header_only(8000, 8000)  # 64 million pixels (under PIL's own bomb limit) in 80 bytes
    assert len(data) < 100
    path = tmp_path / "huge.png"
    path.write_bytes(data)
    # Decoding it fails (the body holds 16 bytes of 192 million) ...
    with pytest.raises(DataError, match="cannot read image") as decoded:
        open_image(str(path), "huge.png")
    assert not isinstance(decoded.value, ImageTooLargeError)
    # ... so the limit can only have come from the header, read before any decoding.
    for source in (str(path), io.BytesIO(data)):
        with pytest.raises(ImageTooLargeError, match="8000x8000 pixels is more than the limit of 40000"):
            open_image(source, "huge.png", max_pixels=200 * 200)
    assert open_image(io.BytesIO(_png_of(gradient(5, 4))), "ok.png", max_pixels=20).size == (5, 4)  # at the limit
    with pytest.raises(ImageTooLargeError):
        open_image(io.BytesIO(_png_of(gradient(5, 4))), "ok.png", max_pixels=19)


def _png_of(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()
