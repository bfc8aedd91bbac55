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


def test_shortest_side_resize_and_centre_crop():
    # 40 x 20 image: left quarter red, middle half green, right quarter blue.
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 255, 0), (10, 0, 30, 20))
    img.paste((0, 0, 255), (30, 0, 40, 20))
    proc = ImageProcessor(ImageProcessorConfig(size=10, mean=(0, 0, 0), std=(1, 1, 1), resample="nearest"))
    out = proc.preprocess(img)
    assert out.shape == (3, 10, 10)
    # scaled to 20 x 10 and cropped to the central 10 x 10: all green
    np.testing.assert_allclose(out[:, 5, 5], [0.0, 1.0, 0.0])
    np.testing.assert_allclose(out[1], 1.0)


def test_exact_resize_and_portrait_input():
    proc = ImageProcessor(ImageProcessorConfig(size=6, resize="exact"))
    assert proc.preprocess(Image.new("RGB", (30, 12))).shape == (3, 6, 6)
    proc = ImageProcessor(ImageProcessorConfig(size=6))
    assert proc.preprocess(Image.new("RGB", (7, 31))).shape == (3, 6, 6)


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
