"""histofold.imageio (decoding, conversions, refs, HDF5, reads through histofold.io) and histofold.synthetic
(render). The resize is histofold.imageops (tests/test_imageops.py)."""
import gzip
import io
import os

import h5py
import numpy as np
import pytest
from PIL import Image
from conftest import shared

from histofold import imageio, synthetic
from histofold import io as hio
from histofold.errors import ImageError
from histofold.imageio import load_ref, read_image


def _save(tmp_path, name, img: Image.Image, **kw):
    path = tmp_path / name
    img.save(path, **kw)
    return path


# ---------------------------------------------------------------- real files

def test_reads_real_tif_and_jpeg():
    tif = next((shared("hcd_kaggle_mock") / "train").glob("*.tif"))
    jpeg = next((shared("lc25000") / "lung_image_sets" / "lung_n").glob("*.jpeg"))
    a, b = read_image(tif), read_image(jpeg)
    assert a.shape == (96, 96, 3) and a.dtype == np.uint8
    assert b.shape == (768, 768, 3) and b.dtype == np.uint8
    assert a.std() > 5 and b.std() > 5  # real tissue, not a blank decode


# ---------------------------------------------------------------- failures

def test_missing_zero_byte_and_directory_raise(tmp_path):
    with pytest.raises(ImageError, match="file not found"):
        read_image(tmp_path / "nope.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match="zero-byte file"):
        read_image(tmp_path / "empty.png")
    with pytest.raises(ImageError, match="not a file"):
        read_image(tmp_path)


@pytest.mark.parametrize("fmt,ext", [("PNG", "png"), ("JPEG", "jpg"), ("TIFF", "tif")])
def test_truncated_images_raise(tmp_path, fmt, ext):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    path = tmp_path / f"cut.{ext}"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match="truncated or unreadable"):
        read_image(path)


def test_truncated_loading_stays_off():
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # else Pillow pads truncated files with grey


def test_garbage_bytes_raise(tmp_path):
    path = tmp_path / "x.jpg"
    path.write_bytes(b"not an image at all" * 10)
    with pytest.raises(ImageError, match="unreadable"):
        read_image(path)


# ---------------------------------------------------------------- conversions

def test_grayscale_8bit_is_replicated(tmp_path):
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    out = read_image(_save(tmp_path, "g.png", Image.fromarray(grey)))
    assert out.shape == (16, 16, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], grey)


def test_16bit_tiff_and_png_are_shifted_by_8(tmp_path):
    values = np.array([[0, 255, 256, 1000], [32768, 65535, 4096, 512]], dtype=np.uint16)
    for name in ("g16.tif", "g16.png"):
        out = read_image(_save(tmp_path, name, Image.fromarray(values)))
        np.testing.assert_array_equal(out[:, :, 0], (values >> 8).astype(np.uint8), err_msg=name)
        np.testing.assert_array_equal(out[:, :, 1], out[:, :, 2])


def test_float_tiff_in_unit_range_is_scaled(tmp_path):
    values = np.array([[0.0, 0.5], [1.0, 0.25]], dtype=np.float32)
    out = read_image(_save(tmp_path, "f.tif", Image.fromarray(values)))
    np.testing.assert_array_equal(out[:, :, 0], [[0, 128], [255, 64]])


def test_rgba_is_composited_onto_white(tmp_path):
    rgba = np.zeros((1, 3, 4), dtype=np.uint8)
    rgba[0, 0] = (200, 10, 50, 255)   # opaque: colour kept
    rgba[0, 1] = (200, 10, 50, 0)     # transparent: white
    rgba[0, 2] = (0, 0, 0, 128)       # half black over white: ~127
    out = read_image(_save(tmp_path, "a.png", Image.fromarray(rgba)))
    np.testing.assert_array_equal(out[0, 0], [200, 10, 50])
    np.testing.assert_array_equal(out[0, 1], [255, 255, 255])
    assert np.all(np.abs(out[0, 2].astype(int) - 127) <= 1)


def test_la_is_composited_onto_white(tmp_path):
    la = Image.fromarray(np.array([[[0, 0], [100, 255]]], dtype=np.uint8))
    out = read_image(_save(tmp_path, "la.png", la))
    np.testing.assert_array_equal(out[0], [[255, 255, 255], [100, 100, 100]])


def test_palette_and_transparent_palette(tmp_path):
    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    out = read_image(_save(tmp_path, "p.png", pal))
    np.testing.assert_array_equal(out[0], [[255, 0, 0], [0, 0, 255]])
    out = read_image(_save(tmp_path, "pt.png", pal, transparency=1))  # index 1 transparent -> white
    np.testing.assert_array_equal(out[0], [[255, 0, 0], [255, 255, 255]])


def test_cmyk_and_bilevel(tmp_path):
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))   # full magenta + yellow = red
    out = read_image(_save(tmp_path, "c.tif", cmyk))
    np.testing.assert_array_equal(out[0, 0], [255, 0, 0])
    bits = Image.fromarray(np.array([[0, 255]], dtype=np.uint8)).convert("1")
    out = read_image(_save(tmp_path, "b.bmp", bits))
    np.testing.assert_array_equal(out[0], [[0, 0, 0], [255, 255, 255]])


def test_as_rgb_array_rejects_wrong_dtype_and_shape():
    with pytest.raises(ImageError, match="uint8"):
        imageio.as_rgb_array(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ImageError, match="shape"):
        imageio.as_rgb_array(np.zeros((4, 4, 2), np.uint8))
    assert imageio.as_rgb_array(np.zeros((4, 4, 1), np.uint8)).shape == (4, 4, 3)


# ---------------------------------------------------------------- reads through histofold.io

def test_read_image_from_an_in_memory_url():
    # URLs go through tf.io.gfile (histofold.io): ram:// stands in for gs://
    rgb = np.random.default_rng(4).integers(0, 256, (9, 7, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    url = "ram://test_imageio/a.png"
    hio.write_bytes(url, buf.getvalue())
    try:
        np.testing.assert_array_equal(read_image(url), rgb)
        np.testing.assert_array_equal(load_ref(("file", url)), rgb)
        with pytest.raises(ImageError, match="file not found: ram://test_imageio/missing.png"):
            read_image("ram://test_imageio/missing.png")
    finally:
        hio.rmtree("ram://test_imageio")


# ---------------------------------------------------------------- refs and HDF5

@pytest.fixture
def h5_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HISTOFOLD_CACHE", str(tmp_path / "cache"))
    x = np.random.default_rng(1).integers(0, 255, (5, 8, 8, 3), dtype=np.uint8)
    plain = tmp_path / "x.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = x
    gz = tmp_path / "x2.h5.gz"
    with open(plain, "rb") as src, gzip.open(gz, "wb") as dst:
        dst.write(src.read())
    return x, str(plain), str(gz)


def test_load_ref_h5_plain_and_gz(h5_files, tmp_path):
    x, plain, gz = h5_files
    for path in (plain, gz):
        for i in (0, 4):
            np.testing.assert_array_equal(load_ref(("h5", path, "x", i)), x[i])
    copies = os.listdir(tmp_path / "cache")
    assert len(copies) == 1 and copies[0].endswith("x2.h5")   # decompressed once, no .part left
    assert imageio.gunzip_cached(gz) == str(tmp_path / "cache" / copies[0])
    with pytest.raises(ImageError, match="out of range"):
        load_ref(("h5", plain, "x", 5))
    with pytest.raises(ImageError, match="no dataset"):
        load_ref(("h5", plain, "y", 0))
    with pytest.raises(ImageError, match="file not found"):
        load_ref(("h5", str(tmp_path / "missing.h5"), "x", 0))


def test_load_ref_file_keeps_the_stored_size_and_rejects_unknown_kinds(tmp_path):
    pixels = np.random.default_rng(2).integers(0, 256, (20, 14, 3), np.uint8)
    path = _save(tmp_path, "a.png", Image.fromarray(pixels))
    out = load_ref(("file", str(path)))
    assert out.shape == (20, 14, 3) and out.dtype == np.uint8     # no resizing here (PixelFormat does it)
    np.testing.assert_array_equal(out, pixels)
    with pytest.raises(TypeError):
        load_ref(("file", str(path)), size=10)                    # the size argument is gone
    with pytest.raises(ValueError, match="file, h5, synthetic, slide"):
        load_ref(("zip", "a"))
    with pytest.raises(ImageError, match="file not found"):
        load_ref(("file", str(tmp_path / "nope.png")))


def test_load_ref_synthetic_matches_render():
    ref = ("synthetic", 3, 11, 48, 1, 2)
    np.testing.assert_array_equal(load_ref(ref), synthetic.render(3, 11, 48, 1, 2))


# ---------------------------------------------------------------- synthetic

def test_render_deterministic_shapes_and_distinct():
    a = synthetic.render(0, 5, 96, 1, 2)
    assert a.shape == (96, 96, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, synthetic.render(0, 5, 96, 1, 2))
    assert not np.array_equal(a, synthetic.render(0, 6, 96, 1, 2))
    assert not np.array_equal(a, synthetic.render(1, 5, 96, 1, 2))
    assert synthetic.render(0, 5, 224, 0, 3).shape == (224, 224, 3)
    with pytest.raises(ValueError, match="outside"):
        synthetic.render(0, 0, 96, 2, 2)


def test_render_looks_like_he():
    imgs = np.stack([synthetic.render(0, i, 64, i % 2, 2) for i in range(40)]).astype(float)
    r, g, b = imgs[..., 0].mean(), imgs[..., 1].mean(), imgs[..., 2].mean()
    assert r > g and b > g          # pink/purple: green absorbed most by both stains
    assert imgs.std() > 20          # texture, not flat colour


def _auc(neg, pos):
    """P(pos > neg) with ties counted half: the ROC AUC of a score."""
    neg, pos = np.asarray(neg)[:, None], np.asarray(pos)[None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


def test_render_classes_differ_but_overlap():
    darkness = lambda label: [255 - synthetic.render(7, i, 64, label, 2).mean() for i in range(150)]
    auc = _auc(darkness(0), darkness(1))
    assert 0.6 < auc < 0.95, auc    # learnable from one crude feature, yet far from separable
    means = [np.mean([255 - synthetic.render(7, i, 48, c, 4).mean() for i in range(80)]) for c in range(4)]
    assert means[0] < means[3], means   # ordinal severity


def test_render_many_gives_distinct_images():
    # no wall-clock assertion here: speed figures live in bench/ (bench/pipeline.py measures it)
    imgs = [synthetic.render(0, i, 96, i % 2, 2) for i in range(300)]
    assert all(a.shape == (96, 96, 3) and a.dtype == np.uint8 for a in imgs)
    assert len({a.tobytes() for a in imgs}) == 300


# ---------------------------------------------------------------- plain-TIFF fast path

def test_plain_tiff_fast_path_matches_pillow(tmp_path):
    real = sorted((shared("hcd_kaggle_mock") / "train").glob("*.tif"))[:20]
    for path in real:  # Kaggle HCD patches are plain RGB TIFFs: the fast path takes them, pixel-exact
        data = path.read_bytes()
        fast = imageio.plain_tiff_rgb(data)
        assert fast is not None
        np.testing.assert_array_equal(fast, imageio.decode_image(data))
        assert fast.flags.writeable
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (37, 53, 3), np.uint8)
    cases = {"plain": ({}, True), "strips": ({"tiffinfo": {278: 5}}, True),
             "lzw": ({"compression": "tiff_lzw"}, False), "deflate": ({"compression": "tiff_deflate"}, False)}
    for name, (kw, fast_expected) in cases.items():
        path = _save(tmp_path, f"{name}.tif", Image.fromarray(rgb), **kw)
        assert (imageio.plain_tiff_rgb(path.read_bytes()) is not None) == fast_expected, name
        np.testing.assert_array_equal(read_image(path), rgb)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])
    for name, img in {"rgba": Image.fromarray(rgba), "grey": Image.fromarray(rgb[..., 0]),
                      "cmyk": Image.fromarray(rgb).convert("CMYK")}.items():
        path = _save(tmp_path, f"{name}.tif", img)
        assert imageio.plain_tiff_rgb(path.read_bytes()) is None, name  # other modes: Pillow's conversions
    data = _save(tmp_path, "t.tif", Image.fromarray(rgb)).read_bytes()
    for cut in (8, 100, len(data) - 1):  # truncated: no fast result, Pillow's error
        assert imageio.plain_tiff_rgb(data[:cut]) is None
        (tmp_path / "cut.tif").write_bytes(data[:cut])
        with pytest.raises(ImageError):
            read_image(tmp_path / "cut.tif")


def test_encode_png_is_a_lossless_standard_png():
    rng = np.random.default_rng(1)
    for shape in [(96, 96, 3), (1, 1, 3), (37, 53, 3)]:
        rgb = rng.integers(0, 256, shape, np.uint8)
        data = imageio.encode_png(rgb)
        with Image.open(io.BytesIO(data)) as img:
            assert img.format == "PNG" and img.mode == "RGB"
            np.testing.assert_array_equal(np.asarray(img), rgb)
    flat = np.full((64, 64, 3), 200, np.uint8)
    assert len(imageio.encode_png(flat)) < flat.nbytes / 5  # compresses (Huffman-only: >= 1 bit/byte)
    with pytest.raises(ValueError):
        imageio.encode_png(np.zeros((4, 4), np.uint8))
