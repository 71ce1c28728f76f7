"""Whole-slide images: open, find tissue, tile at the training resolution, predict, map and score.

A patch model trained at `patch_mpp` microns per pixel (PCam: 96 px at ~0.972 um/px, "10x") sees a
slide through one read plan: a tile is `round(patch_px * patch_mpp / slide.mpp)` level-0 pixels wide,
read at the deepest pyramid level whose downsample is at most that scale (small reads) and resized to
`patch_px` with `imageops.resize_array`, the one antialiased resize of the codebase, exactly once.

    open_slide(path, mpp=None) -> Slide       OpenSlide first (.svs .ndpi .mrxs .scn .bif .vms, generic
                                              tiled TIFF), tifffile for what it cannot read or reads
                                              without its pyramid (SubIFD pyramids, OME-TIFF, strip TIFF)
    read_plan(slide, patch_px=, patch_mpp=)   {"level", "tile_level0", "read_px", "patch_px", ...}
    tissue_mask(slide) -> (mask, downsample)  Otsu on HSV saturation of a thumbnail
    tile_grid(slide, tile_level0=, ...)       every grid cell from (0, 0), its tissue fraction
    tile_dataset(path, xs, ys, ...)           tf.data of (uint8 patches, row index), read by threads
    load_tile(path, x, y, level, read_px, patch_px)   the same pixels one at a time (prepare workers)
    predict_slide / predict_slides            tiles.csv, heatmap.png, overlay.png, <stem>.geojson, slides.csv
    list_slide_tiles(input_dir, ...)          labelled training tiles from annotated slides

TIFF layouts (checked with OpenSlide 4.0 / openslide-bin 4.0.1, tifffile 2026.3):
  - pyramid levels as successive tiled IFDs (what `tests/slide_fixtures.py` writes; also the layout
    of `vips tiffsave --tile --pyramid`): OpenSlide's "generic-tiff", all levels, and OpenSlide 4
    reports openslide.mpp-x/y from XResolution/ResolutionUnit (centimetre or inch).
  - levels as SubIFDs (tifffile's `subifds=`, OME-TIFF pyramids as bioformats writes them): OpenSlide
    opens it as generic-tiff but sees level 0 only; open_slide notices (tifffile finds more levels) and
    uses tifffile.
  - strip (untiled) TIFF: OpenSlide refuses it ("unsupported"); tifffile reads it, one level.
  The tifffile backend decodes what tifffile decodes without imagecodecs (raw, deflate/zlib, LZW,
  PackBits); a JPEG-compressed TIFF OpenSlide cannot read needs `pip install imagecodecs`, and says so.

mpp: openslide.mpp-x; else OME Pixels PhysicalSizeX (unit-aware); else XResolution with ResolutionUnit
inch/centimetre; else an Aperio "MPP = " description. Values outside (0.01, 100) um/px are treated as
missing (a 72-dpi default is not a microscope); `mpp=` overrides all of it. A slide without mpp can be
opened and read, but read_plan raises SlideError telling to pass --mpp.

Reads are thread-safe on both backends (OpenSlide handles are; the tifffile backend reads segments
with os.pread and decodes outside any lock), so one Slide serves every reader thread.
"""
from __future__ import annotations

import collections
import logging
import math
import os
import re
import threading
import time

import numpy as np

from histofold import imageops, io
from histofold.annotations import label_tiles, label_tiles_from_mask, load_annotations, load_mask  # noqa: F401

from histofold.errors import DataError

log = logging.getLogger("histofold")

SLIDE_EXTENSIONS = (".svs", ".ndpi", ".mrxs", ".tif", ".tiff", ".scn", ".bif", ".vms", ".svslide")
ANNOTATION_SUFFIXES = (".geojson", ".json", ".xml")
MASK_SUFFIX = "_mask.png"
MPP_RANGE = (0.01, 100.0)          # plausible microns per pixel of a slide scan
THUMBNAIL_BAND = 2048              # level rows read per band while building a thumbnail
WHITE = 255


class SlideError(DataError):
    """A slide that cannot be used; str() is one line naming the slide, what is wrong and the fix."""


# ------------------------------------------------------------------------------------------ Slide

class Slide:
    """An open whole-slide image. Coordinates are level-0 pixels, sizes are (width, height)."""

    def __init__(self, path: str, backend: str, reader, level_dimensions, level_downsamples,
                 mpp: float | None, properties: dict | None = None):
        self.path = path
        self.backend = backend
        self._reader = reader
        self.level_dimensions = [(int(w), int(h)) for w, h in level_dimensions]
        self.level_downsamples = [float(d) for d in level_downsamples]
        self.mpp = mpp
        self.properties = dict(properties or {})

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def read_region(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        """(h, w, 3) uint8 RGB of level `level` whose top-left is level-0 (x, y); transparent and
        out-of-bounds pixels are composited onto white."""
        if not 0 <= level < self.level_count:
            raise ValueError(f"{self.path}: level {level} does not exist (levels 0..{self.level_count - 1})")
        if w <= 0 or h <= 0:
            raise ValueError(f"{self.path}: region size {w}x{h} must be positive")
        return self._reader.read(int(x), int(y), int(level), int(w), int(h))

    def thumbnail(self, max_side: int = 2048) -> tuple[np.ndarray, float]:
        """(image uint8, downsample vs level 0): the whole slide with its longer side at most max_side
        (never upscaled), from the smallest level that is still at least that large, read in bands."""
        w0, h0 = self.dimensions
        ds = max(1.0, max(w0, h0) / float(max_side))
        tw, th = max(1, int(round(w0 / ds))), max(1, int(round(h0 / ds)))
        level = self.best_level(ds)
        lw, lh = self.level_dimensions[level]
        lds = self.level_downsamples[level]
        bands, done = [], 0
        for top in range(0, lh, THUMBNAIL_BAND):
            bottom = min(lh, top + THUMBNAIL_BAND)
            end = th if bottom == lh else int(round(bottom * lds / ds))
            if end <= done:
                continue
            band = self.read_region(0, int(round(top * lds)), level, lw, bottom - top)
            bands.append(imageops.resize_array(band, (end - done, tw)))
            done = end
        return np.concatenate(bands, axis=0), ds

    def best_level(self, downsample: float) -> int:
        """The deepest level whose downsample is at most `downsample` (level 0 if none is)."""
        ok = [i for i, d in enumerate(self.level_downsamples) if d <= downsample * (1 + 1e-3)]
        return max(ok, key=lambda i: self.level_downsamples[i]) if ok else 0

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (f"Slide({self.path!r}, backend={self.backend}, levels={self.level_dimensions}, "
                f"mpp={self.mpp})")


def _composite_white(rgba: np.ndarray) -> np.ndarray:
    """(h, w, 4) straight-alpha RGBA -> (h, w, 3) RGB on white."""
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    a = alpha.astype(np.uint16)
    rgb = (rgba[..., :3].astype(np.uint16) * a + WHITE * (255 - a) + 127) // 255
    return rgb.astype(np.uint8)


class _OpenSlideReader:
    def __init__(self, osr, path: str):
        self.osr, self.path = osr, path

    def read(self, x, y, level, w, h):
        import openslide

        try:
            region = self.osr.read_region((x, y), level, (w, h))
        except openslide.OpenSlideError as e:
            raise SlideError(f"{self.path}: reading {w}x{h} at ({x}, {y}) level {level} failed "
                             f"(corrupt slide?): {e}") from None
        return _composite_white(np.asarray(region))

    def close(self):
        self.osr.close()


class _TiffReader:
    """Region reads of a tiled or stripped TIFF pyramid without zarr: the segments (tiles or strips)
    under a region are read with os.pread and decoded by tifffile, with a small LRU of decoded segments."""

    CACHE_SEGMENTS = 256

    def __init__(self, path: str, tif, pages):
        self.path, self.tif, self.pages = path, tif, pages
        self.fd = os.open(path, os.O_RDONLY)
        self.cache: collections.OrderedDict = collections.OrderedDict()
        self.lock = threading.Lock()
        try:
            for level in range(len(pages)):
                self._segment(level, 0)  # decodable? (raises SlideError naming the compression)
        except BaseException:
            self.close()
            raise

    def _geometry(self, page):
        if page.is_tiled:
            return page.tilewidth, page.tilelength, math.ceil(page.imagewidth / page.tilewidth)
        return page.imagewidth, page.rowsperstrip, 1

    def _segment(self, level: int, index: int) -> np.ndarray:
        key = (level, index)
        with self.lock:
            seg = self.cache.get(key)
            if seg is not None:
                self.cache.move_to_end(key)
                return seg
        page = self.pages[level]
        offset, count = page.dataoffsets[index], page.databytecounts[index]
        sw, sh, _ = self._geometry(page)
        if not count:  # an empty (sparse) segment
            seg = np.full((sh, sw, 3), WHITE, np.uint8)
        else:
            data = os.pread(self.fd, count, offset)
            if len(data) < count:
                raise SlideError(f"{self.path}: truncated file (segment {index} of level {level} ends "
                                 f"past the end of the file)")
            try:
                seg, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
            except Exception as e:  # tifffile raises ValueError/KeyError/TiffFileError/codec errors
                hint = " (pip install imagecodecs)" if "imagecodecs" in str(e) else ""
                raise SlideError(f"{self.path}: cannot decode level {level} ({page.compression.name} "
                                 f"compression){hint}: {e}") from None
            seg = _to_rgb(np.asarray(seg).reshape(seg.shape[-3:]))
        with self.lock:
            self.cache[key] = seg
            while len(self.cache) > self.CACHE_SEGMENTS:
                self.cache.popitem(last=False)
        return seg

    def read(self, x, y, level, w, h):
        page = self.pages[level]
        ds0 = self.pages[0].imagewidth / page.imagewidth, self.pages[0].imagelength / page.imagelength
        lx, ly = int(math.floor(x / ds0[0] + 1e-9)), int(math.floor(y / ds0[1] + 1e-9))
        out = np.full((h, w, 3), WHITE, np.uint8)
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + w, page.imagewidth), min(ly + h, page.imagelength)
        if x0 >= x1 or y0 >= y1:
            return out
        sw, sh, across = self._geometry(page)
        for sy in range(y0 // sh, (y1 - 1) // sh + 1):
            for sx in range(x0 // sw, (x1 - 1) // sw + 1):
                seg = self._segment(level, sy * across + sx)
                gx0, gy0 = sx * sw, sy * sh                      # segment origin in the level
                ax0, ay0 = max(x0, gx0), max(y0, gy0)
                ax1, ay1 = min(x1, gx0 + seg.shape[1]), min(y1, gy0 + seg.shape[0])
                if ax0 < ax1 and ay0 < ay1:
                    out[ay0 - ly:ay1 - ly, ax0 - lx:ax1 - lx] = seg[ay0 - gy0:ay1 - gy0, ax0 - gx0:ax1 - gx0]
        return out

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            self.tif.close()


def _to_rgb(seg: np.ndarray) -> np.ndarray:
    """(h, w, samples) uint8 segment -> RGB (grey replicated; RGBA composited onto white)."""
    samples = seg.shape[-1]
    if samples == 3:
        return seg
    if samples == 1:
        return np.repeat(seg, 3, axis=-1)
    if samples == 4:
        return _composite_white(seg)
    raise SlideError(f"{samples} samples per pixel: not an RGB slide")


# ------------------------------------------------------------------------------------------ opening

def slide_stem(path) -> str:
    """File name without its slide extension (and a `.ome` before it): `a/b.ome.tif` -> `b`."""
    name = io.basename(path)
    lower = name.lower()
    for ext in SLIDE_EXTENSIONS:
        if lower.endswith(ext):
            name = name[: -len(ext)]
            break
    return name[:-4] if name.lower().endswith(".ome") else name


def is_slide(path) -> bool:
    name = io.basename(path)
    return not name.startswith(".") and name.lower().endswith(SLIDE_EXTENSIONS)


def open_slide(path, *, mpp: float | None = None, backend: str = "auto") -> Slide:
    """Open a slide: OpenSlide first, tifffile for plain/SubIFD/OME pyramids (module docstring).

    mpp: overrides the metadata. backend: auto | openslide | tifffile (tests force one).
    Raises SlideError naming the file when it cannot be opened."""
    path = os.fspath(path)
    if io.is_url(path):
        raise SlideError(f"{path}: slides are read from local files (OpenSlide cannot read URLs); "
                         f"copy it first (gsutil cp / kaggle datasets)")
    if not os.path.isfile(path):
        raise SlideError(f"{path}: no such slide file")
    if mpp is not None and not mpp > 0:
        raise SlideError(f"{path}: --mpp={mpp} must be a positive number of microns per pixel")
    if backend not in ("auto", "openslide", "tifffile"):
        raise ValueError(f"backend={backend!r}: use auto, openslide or tifffile")
    errors = []
    slide = None
    if backend in ("auto", "openslide"):
        try:
            slide = _open_openslide(path)
        except SlideError as e:
            errors.append(f"OpenSlide: {e}")
    if slide is not None and backend == "auto" and slide.properties.get("openslide.vendor") == "generic-tiff":
        levels = _tifffile_level_count(path)
        if levels > slide.level_count:  # a SubIFD/OME pyramid OpenSlide sees as one level
            slide.close()
            slide = None
    if slide is None and backend in ("auto", "tifffile"):
        try:
            slide = _open_tifffile(path)
        except SlideError as e:
            errors.append(f"tifffile: {e}")
    if slide is None:
        raise SlideError(f"{path}: not a readable slide ({'; '.join(errors) or 'no backend'}); check the file "
                         f"is complete (re-download) and is a format OpenSlide or tifffile reads")
    if mpp is not None:
        slide.mpp = float(mpp)
    return slide


def _open_openslide(path: str) -> Slide:
    try:
        import openslide
    except ImportError as e:  # openslide-bin missing: tifffile may still do
        raise SlideError(f"openslide is not importable ({e}); pip install openslide-python openslide-bin") from None
    try:
        if openslide.OpenSlide.detect_format(path) is None:
            raise SlideError("unsupported format")
        osr = openslide.OpenSlide(path)
    except (openslide.OpenSlideError, OSError) as e:
        raise SlideError(f"{type(e).__name__}: {e}") from None
    props = dict(osr.properties)
    mpp = _plausible_mpp(_float(props.get("openslide.mpp-x")), path)
    return Slide(path, "openslide", _OpenSlideReader(osr, path), osr.level_dimensions,
                 osr.level_downsamples, mpp, props)


def _tifffile_level_count(path: str) -> int:
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            return len(tif.series[0].levels) if tif.series else 0
    except Exception:  # not a TIFF tifffile parses: keep OpenSlide's view
        return 0


def _open_tifffile(path: str) -> Slide:
    import tifffile

    try:
        tif = tifffile.TiffFile(path)
    except Exception as e:  # TiffFileError, struct.error, ValueError on garbage
        raise SlideError(f"{type(e).__name__}: {e}") from None
    try:
        if not tif.series:
            raise SlideError("no image series")
        series = tif.series[0]
        pages = [lvl.keyframe for lvl in series.levels]
        for i, page in enumerate(pages):
            if page.dtype != np.uint8 or page.planarconfig != 1 or page.samplesperpixel not in (1, 3, 4):
                raise SlideError(f"level {i} is {page.dtype}, {page.samplesperpixel} samples, planar "
                                 f"config {page.planarconfig}: only 8-bit grey/RGB(A) contiguous slides are read")
        w0, h0 = pages[0].imagewidth, pages[0].imagelength
        dims = [(p.imagewidth, p.imagelength) for p in pages]
        downs = [(w0 / w + h0 / h) / 2 for w, h in dims]
        order = np.argsort(downs, kind="stable")       # level 0 first, whatever the IFD order
        pages = [pages[i] for i in order]
        mpp = _plausible_mpp(_tiff_mpp(tif, pages[0]), path)
        props = {"tifffile.series": series.name or "", "tifffile.is_ome": str(bool(tif.is_ome))}
        reader = _TiffReader(path, tif, pages)  # closes tif from now on
    except SlideError:
        tif.close()
        raise
    except Exception as e:
        tif.close()
        raise SlideError(f"{type(e).__name__}: {e}") from None
    return Slide(path, "tifffile", reader, [dims[i] for i in order], [downs[i] for i in order], mpp, props)


_OME_UNITS = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6, "Å": 1e-4}


def _tiff_mpp(tif, page) -> float | None:
    if tif.is_ome and tif.ome_metadata:
        m = re.search(r"<(?:\w+:)?Pixels\b[^>]*", tif.ome_metadata)
        if m:
            size = re.search(r'PhysicalSizeX="([^"]+)"', m.group(0))
            unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', m.group(0))
            if size:
                scale = _OME_UNITS.get(unit.group(1) if unit else "µm")
                value = _float(size.group(1))
                if scale and value:
                    return value * scale
    tags = page.tags
    res, unit = tags.get("XResolution"), tags.get("ResolutionUnit")
    if res is not None and unit is not None:
        num, den = res.value if isinstance(res.value, tuple) else (res.value, 1)
        per_unit = num / den if den else 0
        microns = {2: 25400.0, 3: 10000.0}.get(int(unit.value))
        if microns and per_unit > 0:
            return microns / per_unit
    desc = page.description or ""
    m = re.search(r"\bMPP\s*=\s*([0-9.]+)", desc)
    return _float(m.group(1)) if m else None


def _float(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _plausible_mpp(mpp: float | None, path: str) -> float | None:
    if mpp is None:
        return None
    if not MPP_RANGE[0] < mpp < MPP_RANGE[1]:
        log.warning("%s: ignoring metadata resolution %.4g um/px (not a microscope scan); pass --mpp", path, mpp)
        return None
    return mpp


# ------------------------------------------------------------------------------------------ planning

def read_plan(slide: Slide, *, patch_px: int, patch_mpp: float) -> dict:
    """Where and how big to read so a tile matches the training resolution.

    tile_level0 = round(patch_px * patch_mpp / slide.mpp); level = the deepest level whose downsample is
    at most tile_level0 / patch_px; read_px = round(tile_level0 / downsample). When that level is not
    level 0, tile_level0 is then snapped to round(read_px * downsample), the level-0 extent actually read.

    -> {"level", "tile_level0", "read_px", "patch_px", "downsample", "slide_mpp"}."""
    if slide.mpp is None:
        raise SlideError(f"{slide.path}: the slide has no resolution metadata (microns per pixel); pass "
                         f"--mpp=<um/px at level 0> (e.g. 0.25 for 40x, 0.5 for 20x)")
    if not (patch_px > 0 and patch_mpp > 0):
        raise ValueError(f"patch_px={patch_px} and patch_mpp={patch_mpp} must be positive")
    tile_level0 = max(1, int(round(patch_px * patch_mpp / slide.mpp)))
    scale = tile_level0 / patch_px
    if scale < 1:
        log.warning("%s: the slide (%.3g um/px) is coarser than the training resolution (%.3g um/px): "
                    "tiles are upsampled", slide.path, slide.mpp, patch_mpp)
    level = slide.best_level(scale)
    downsample = slide.level_downsamples[level]
    read_px = max(1, int(round(tile_level0 / downsample)))
    if level > 0:
        # the tile is what is read: read_px level pixels = read_px x downsample level-0 px (within half a
        # level pixel of the target). With an integral downsample this keeps every grid position on a
        # level pixel, where OpenSlide would otherwise interpolate sub-pixel offsets.
        tile_level0 = max(1, int(round(read_px * downsample)))
    return {"level": level, "tile_level0": tile_level0, "read_px": read_px, "patch_px": int(patch_px),
            "downsample": downsample, "slide_mpp": slide.mpp}


MASK_PX_PER_TILE = 16    # predict/list: the tissue mask gets at least this many pixels per tile side ...
MASK_MAX_SIDE = 8192     # ... up to this thumbnail side


def mask_side(slide: Slide, tile_level0: int, max_side: int = 2048) -> int:
    """Thumbnail side for the tissue mask of a grid of tile_level0 tiles: max_side, or more (up to
    MASK_MAX_SIDE) so a tile spans MASK_PX_PER_TILE mask pixels: at ~6 px per tile sparse tissue blurs
    into the glass and falls under the threshold, and 16 keeps an Aperio 40x slide's thumbnail on its
    smallest level (a 100k px slide, 373 px tiles: a 4.3k px thumbnail from the 1/16 level)."""
    want = math.ceil(MASK_PX_PER_TILE * max(slide.dimensions) / max(1, tile_level0))
    return int(max(max_side, min(MASK_MAX_SIDE, want)))


def tissue_mask(slide: Slide, *, max_side: int = 2048) -> tuple[np.ndarray, float]:
    """(bool mask, downsample vs level 0) of tissue on a thumbnail of the slide (see tissue_from_rgb)."""
    thumb, ds = slide.thumbnail(max_side)
    return tissue_from_rgb(thumb), ds


SAT_CLAMP = (12, 48)   # Otsu's saturation threshold is kept in this range (0-255 scale)
DARK_MAX = 40          # max(R, G, B) below this: pen, folds, scanner black -> not tissue
WHITE_MIN = 225        # min(R, G, B) above this: glass, background -> not tissue


def tissue_from_rgb(rgb: np.ndarray) -> np.ndarray:
    """Tissue pixels of an RGB image: HSV saturation (3x3 median) above its Otsu threshold, clamped to
    SAT_CLAMP so that an all-tissue or all-glass thumbnail is not split in half, minus near-black and
    near-white pixels. Glass is unsaturated grey-white; H&E is saturated pink/purple."""
    from scipy import ndimage

    rgb = np.asarray(rgb)
    mx = rgb.max(axis=-1).astype(np.int32)
    mn = rgb.min(axis=-1).astype(np.int32)
    sat = ((mx - mn) * 255 // np.maximum(mx, 1)).astype(np.uint8)
    sat = ndimage.median_filter(sat, size=3, mode="nearest")
    dark, white = mx < DARK_MAX, mn > WHITE_MIN
    valid = ~dark
    thr = otsu_threshold(sat[valid]) if valid.any() else SAT_CLAMP[1]
    thr = min(max(thr, SAT_CLAMP[0]), SAT_CLAMP[1])
    return (sat > thr) & ~dark & ~white


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 values: the t maximising the between-class variance of <= t vs > t."""
    hist = np.bincount(np.asarray(values, dtype=np.uint8).ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0
    levels = np.arange(256)
    w0 = np.cumsum(hist)
    w1 = total - w0
    m0 = np.cumsum(hist * levels)
    mean0 = m0 / np.maximum(w0, 1)
    mean1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return int(np.argmax(between))


def tile_grid(slide: Slide, *, tile_level0: int, stride_level0: int | None = None, mask=None,
              mask_downsample=None, min_tissue: float = 0.25):
    """Every grid cell from level-0 (0, 0) with stride `stride_level0` (default the tile size) until
    the slide is covered (edge tiles reach past it; reads pad them with white).

    Columns: x, y, w, h (level-0 px, top-left), row, col (grid indices), tissue (fraction of the tile
    that is tissue in the mask; the part outside the slide counts as background), is_tissue
    (tissue >= min_tissue). mask None: tissue_mask(slide)."""
    import pandas as pd

    tile = int(tile_level0)
    stride = int(stride_level0 or tile)
    if tile <= 0 or stride <= 0:
        raise ValueError(f"tile {tile} and stride {stride} (level-0 px) must be positive")
    if mask is None:
        mask, mask_downsample = tissue_mask(slide)
    elif mask_downsample is None:
        raise ValueError("tile_grid: mask given without mask_downsample")
    w0, h0 = slide.dimensions
    xs = _grid_starts(w0, tile, stride)
    ys = _grid_starts(h0, tile, stride)
    gx, gy = np.meshgrid(xs, ys)                       # row-major: y outer, x inner
    rows, cols = np.meshgrid(np.arange(len(ys)), np.arange(len(xs)), indexing="ij")
    x, y = gx.ravel(), gy.ravel()
    tissue = _mask_fraction(np.asarray(mask, bool), float(mask_downsample), x, y, tile)
    return pd.DataFrame({"x": x.astype(np.int64), "y": y.astype(np.int64),
                         "w": np.full(x.size, tile, np.int64), "h": np.full(x.size, tile, np.int64),
                         "row": rows.ravel().astype(np.int64), "col": cols.ravel().astype(np.int64),
                         "tissue": tissue, "is_tissue": tissue >= min_tissue})


def _grid_starts(extent: int, tile: int, stride: int) -> np.ndarray:
    """0, stride, ... up to the first start whose tile reaches the end of `extent`."""
    n = 1 if extent <= tile else 1 + math.ceil((extent - tile) / stride)
    return np.arange(n, dtype=np.int64) * stride


def _mask_fraction(mask: np.ndarray, ds: float, x: np.ndarray, y: np.ndarray, tile: int) -> np.ndarray:
    """Fraction of each tile's mask pixels that are set (a summed-area table; outside = unset)."""
    hm, wm = mask.shape
    sat = np.zeros((hm + 1, wm + 1), np.int64)
    sat[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.int64), axis=1)
    x0 = np.round(x / ds).astype(np.int64)
    y0 = np.round(y / ds).astype(np.int64)
    x1 = np.maximum(np.round((x + tile) / ds).astype(np.int64), x0 + 1)
    y1 = np.maximum(np.round((y + tile) / ds).astype(np.int64), y0 + 1)
    area = (x1 - x0) * (y1 - y0)
    cx0, cx1 = np.clip(x0, 0, wm), np.clip(x1, 0, wm)
    cy0, cy1 = np.clip(y0, 0, hm), np.clip(y1, 0, hm)
    inside = sat[cy1, cx1] - sat[cy0, cx1] - sat[cy1, cx0] + sat[cy0, cx0]
    return inside / area


# ------------------------------------------------------------------------------------------ reading tiles

def read_tile(slide: Slide, x: int, y: int, level: int, read_px: int, patch_px: int) -> np.ndarray:
    """(patch_px, patch_px, 3) uint8: the read_px square at level `level` from level-0 (x, y), resized
    once with imageops.resize_array. tile_dataset and load_tile both go through here."""
    region = slide.read_region(x, y, level, read_px, read_px)
    return imageops.resize_array(region, patch_px)


class _TileReader:
    """Reads tiles in order with a thread pool and a bounded lookahead; records the first error so
    the caller can report it as one SlideError line instead of a tf.data traceback."""

    def __init__(self, slide_path, xs, ys, *, level, read_px, patch_px, batch_size, threads, mpp,
                 on_batch=None):
        self.slide_path, self.mpp = slide_path, mpp
        self.xs = np.asarray(xs, dtype=np.int64).ravel()
        self.ys = np.asarray(ys, dtype=np.int64).ravel()
        if self.xs.shape != self.ys.shape:
            raise ValueError(f"xs ({self.xs.size}) and ys ({self.ys.size}) differ in length")
        self.level, self.read_px, self.patch_px = int(level), int(read_px), int(patch_px)
        self.batch_size, self.threads = max(1, int(batch_size)), max(1, int(threads))
        self.lookahead = max(2 * self.batch_size, 4 * self.threads)
        self.on_batch = on_batch
        self.errors: list[BaseException] = []

    def batches(self):
        """Yields (uint8 (B, P, P, 3), int64 (B,) row indices) in row order."""
        from concurrent.futures import ThreadPoolExecutor

        n = self.xs.size
        try:
            slide = open_slide(self.slide_path, mpp=self.mpp)
        except Exception as e:
            self.errors.append(e)
            raise
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="slide-read")

        def read(i):
            return read_tile(slide, int(self.xs[i]), int(self.ys[i]), self.level, self.read_px, self.patch_px)

        try:
            pending = collections.deque()
            nxt = 0
            for start in range(0, n, self.batch_size):
                stop = min(n, start + self.batch_size)
                while nxt < n and nxt < stop + self.lookahead:
                    pending.append(pool.submit(read, nxt))
                    nxt += 1
                batch = np.stack([pending.popleft().result() for _ in range(start, stop)])
                if self.on_batch is not None:
                    self.on_batch(stop - start)
                yield batch, np.arange(start, stop, dtype=np.int64)
        except Exception as e:
            self.errors.append(e)
            raise
        finally:  # also when the consumer stops early: no reads left running on a closed slide
            pool.shutdown(wait=True, cancel_futures=True)
            slide.close()


def _tile_dataset(slide_path, xs, ys, *, level, read_px, patch_px, batch_size=64, threads=4, mpp=None,
                  on_batch=None):
    import tensorflow as tf

    reader = _TileReader(slide_path, xs, ys, level=level, read_px=read_px, patch_px=patch_px,
                         batch_size=batch_size, threads=threads, mpp=mpp, on_batch=on_batch)
    p = reader.patch_px
    ds = tf.data.Dataset.from_generator(
        reader.batches,
        output_signature=(tf.TensorSpec((None, p, p, 3), tf.uint8), tf.TensorSpec((None,), tf.int64)))
    ds = ds.apply(tf.data.experimental.assert_cardinality(math.ceil(reader.xs.size / reader.batch_size)))
    return ds.prefetch(2), reader


def tile_dataset(slide_path, xs, ys, *, level: int, read_px: int, patch_px: int, batch_size: int = 64,
                 threads: int = 4, mpp=None, on_batch=None):
    """tf.data.Dataset of (uint8 (B, patch_px, patch_px, 3), int64 (B,) index into xs) in row order.

    A generator (from_generator) keeps `threads` reader threads busy with a bounded lookahead of
    max(2 batches, 4 x threads) tiles and the dataset prefetches 2 batches, so the model runs while
    the next tiles are read. Every region is resized to patch_px once (read_tile). on_batch(n) is
    called as each batch is handed over (progress bars). The slide is opened per pass."""
    return _tile_dataset(slide_path, xs, ys, level=level, read_px=read_px, patch_px=patch_px,
                         batch_size=batch_size, threads=threads, mpp=mpp, on_batch=on_batch)[0]


_TILE_SLIDES: collections.OrderedDict = collections.OrderedDict()
_TILE_PID = [None]
_TILE_LOCK = threading.Lock()
TILE_CACHE_SLIDES = 8


def load_tile(path, x, y, level, read_px, patch_px) -> np.ndarray:
    """(patch_px, patch_px, 3) uint8: exactly what tile_dataset yields for that tile. TensorFlow-free;
    slides stay open per process (keyed by pid, so a forked worker never uses its parent's handle),
    at most TILE_CACHE_SLIDES at a time."""
    path = os.fspath(path)
    with _TILE_LOCK:
        if _TILE_PID[0] != os.getpid():
            _TILE_SLIDES.clear()  # inherited handles belong to the parent: drop them, do not close
            _TILE_PID[0] = os.getpid()
        slide = _TILE_SLIDES.get(path)
        if slide is None:
            slide = open_slide(path)
            _TILE_SLIDES[path] = slide
            while len(_TILE_SLIDES) > TILE_CACHE_SLIDES:
                _TILE_SLIDES.popitem(last=False)[1].close()
        _TILE_SLIDES.move_to_end(path)
    return read_tile(slide, int(x), int(y), int(level), int(read_px), int(patch_px))


# ------------------------------------------------------------------------------------------ predicting

def slide_score(p_positive: np.ndarray, top_k: int = 10) -> float:
    """Slide-level score: the mean of the top_k highest tile probabilities of the positive class
    (all tiles when fewer; NaN for a slide without tissue tiles). Top-k rather than the max because
    one artefact tile should not decide a slide, rather than the mean because a small metastasis
    covers few tiles."""
    p = np.asarray(p_positive, dtype=np.float64).ravel()
    if p.size == 0:
        return float("nan")
    k = max(1, min(int(top_k), p.size))
    return float(np.mean(np.partition(p, p.size - k)[p.size - k:]))


def keras_predict_fn(model, *, num_classes: int, tta: int = 1):
    """A predict_fn for predict_slide from one Keras model: uint8 batches -> float32 -> the model
    (with `tta`-way dihedral TTA from histofold.tta) -> (N, K) class probabilities."""
    import tensorflow as tf

    from histofold import tta as tta_mod

    forward = tta_mod.make_forward(model)
    ks = tta_mod.tta_subset(tta)

    def predict_fn(dataset) -> np.ndarray:
        out = [tta_mod.tta_batch(forward, tf.cast(x, tf.float32), ks) for x, _ in dataset]
        width = int(model.output.shape[-1])
        p = np.concatenate(out) if out else np.zeros((0, width), np.float32)
        return tta_mod.to_class_probs(p, num_classes)

    return predict_fn


def predict_slide(path, *, predict_fn, classes: list[str], patch_px: int, patch_mpp: float, out_dir: str,
                  mpp=None, stride=None, min_tissue=0.25, batch_size=64, top_k=10, threshold=0.5,
                  threads: int = 4, max_side: int = 2048, progress: bool = True) -> dict:
    """Predict every tissue tile of one slide; writes out_dir/<stem>/ and returns its summary row.

    predict_fn(dataset) -> (N, K) probabilities in dataset order (the caller owns models, TTA, folds);
    binary (N,) or (N, 1) P(classes[1]) is accepted too. stride: grid step in patch pixels at the
    training resolution (None = patch_px, no overlap).

    out_dir/<stem>/tiles.csv      every grid cell: x, y, w, h (level-0 px), row, col, tissue, is_tissue,
                                  p_<class>; p_ columns are EMPTY for the non-tissue cells (not predicted)
    out_dir/<stem>/heatmap.png    P(positive) per tile, positive = the last class, with a colour bar
    out_dir/<stem>/overlay.png    the heatmap over the thumbnail
    out_dir/<stem>/<stem>.geojson one QuPath "tile" Feature per tissue tile: classification = predicted
                                  class (binary: positive when p >= threshold, else argmax), measurements
                                  = every p_<class> and the tissue fraction
    out_dir/<stem>/<stem>_contours.geojson   binary: merged outlines of the positive tiles (annotations)

    Summary: slide, path, status ("ok"), tiles, tissue_tiles, score (slide_score of the positive class
    over the tissue tiles), label (binary: classes[1] if score >= threshold else classes[0]; more
    classes: the class with the highest mean tile probability; "" without tissue), seconds (wall, all of
    it), tiles_per_s (tissue tiles / seconds), mpp, level, read_px, tile_level0, out_dir."""
    from tqdm.auto import tqdm

    from histofold import tta as tta_mod

    t0 = time.perf_counter()
    classes = [str(c) for c in classes]
    if len(classes) < 2:
        raise ValueError(f"classes={classes}: need at least 2")
    path = os.fspath(path)
    stem = slide_stem(path)
    with open_slide(path, mpp=mpp) as slide:
        plan = read_plan(slide, patch_px=patch_px, patch_mpp=patch_mpp)
        thumb, thumb_ds = slide.thumbnail(mask_side(slide, plan["tile_level0"], max_side))
        stride_l0 = None if stride is None else max(1, int(round(stride * plan["tile_level0"] / patch_px)))
        grid = tile_grid(slide, tile_level0=plan["tile_level0"], stride_level0=stride_l0,
                         mask=tissue_from_rgb(thumb), mask_downsample=thumb_ds, min_tissue=min_tissue)
        dims, used_mpp = slide.dimensions, slide.mpp
    sel = np.flatnonzero(grid["is_tissue"].to_numpy())
    k = len(classes)
    probs = np.zeros((0, k))
    if sel.size:
        with tqdm(total=int(sel.size), desc=stem, unit="tile", disable=not progress, leave=False) as bar:
            dataset, reader = _tile_dataset(path, grid["x"].to_numpy()[sel], grid["y"].to_numpy()[sel],
                                            level=plan["level"], read_px=plan["read_px"], patch_px=patch_px,
                                            batch_size=batch_size, threads=threads, mpp=mpp,
                                            on_batch=bar.update)
            try:
                probs = np.asarray(predict_fn(dataset), dtype=np.float64)
            except Exception:
                if reader.errors:  # the real cause, not tf.data's wrapping of it
                    err = reader.errors[0]
                    raise (err if isinstance(err, SlideError) else SlideError(f"{path}: {err}")) from None
                raise
        if k == 2 and (probs.ndim == 1 or probs.shape[-1] == 1):
            probs = tta_mod.to_class_probs(probs, 2)
        if probs.shape != (sel.size, k):
            raise ValueError(f"{path}: predict_fn returned shape {probs.shape}, expected ({sel.size}, {k}) "
                             f"(one row per tissue tile, one column per class)")
    pcols = [f"p_{c}" for c in classes]
    for c, col in enumerate(pcols):
        values = np.full(len(grid), np.nan)
        values[sel] = probs[:, c]
        grid[col] = values
    p_pos = probs[:, -1]
    score = slide_score(p_pos, top_k)
    if not sel.size:
        label = ""
    elif k == 2:
        label = classes[1] if score >= threshold else classes[0]
    else:
        label = classes[int(probs.mean(axis=0).argmax())]
    folder = io.join(out_dir, stem)
    io.makedirs(folder)
    io.write_csv(io.join(folder, "tiles.csv"), grid)
    tile_px = plan["tile_level0"]
    stride_px = stride_l0 or tile_px
    _write_heatmap(io.join(folder, "heatmap.png"), grid, p_pos_col=pcols[-1], dims=dims, tile=tile_px,
                   stride=stride_px, title=f"{stem}: P({classes[-1]}), score {score:.3f}")
    _write_heatmap(io.join(folder, "overlay.png"), grid, p_pos_col=pcols[-1], dims=dims, tile=tile_px,
                   stride=stride_px, title=f"{stem}: P({classes[-1]}) over tissue", thumbnail=thumb)
    tiles_geo = tiles_geojson(grid.iloc[sel], classes=classes, threshold=threshold)
    io.write_text(io.join(folder, f"{stem}.geojson"), _dumps(tiles_geo))
    if k == 2:
        io.write_text(io.join(folder, f"{stem}_contours.geojson"),
                      _dumps(contours_geojson(grid.iloc[sel], classes=classes, threshold=threshold)))
    seconds = time.perf_counter() - t0
    return {"slide": stem, "path": path, "status": "ok", "error": "", "tiles": int(len(grid)),
            "tissue_tiles": int(sel.size), "score": score, "label": label, "seconds": round(seconds, 3),
            "tiles_per_s": round(sel.size / seconds, 2) if seconds > 0 else float("nan"),
            "mpp": used_mpp, "level": plan["level"], "read_px": plan["read_px"],
            "tile_level0": plan["tile_level0"], "out_dir": folder}


def list_slides(path) -> list[str]:
    """One slide file, or the slide files (SLIDE_EXTENSIONS, not hidden) directly inside a folder."""
    path = os.fspath(path)
    if io.isdir(path):
        found = [io.join(path, n) for n in io.listdir(path) if is_slide(n) and io.isfile(io.join(path, n))]
        if not found:
            raise FileNotFoundError(f"no slides ({' '.join(SLIDE_EXTENSIONS)}) in {path}")
        return found
    if not io.exists(path):
        raise FileNotFoundError(f"--slides={path}: no such file or folder")
    return [path]


def predict_slides(path, *, out_dir, progress: bool = True, **kw):
    """predict_slide for one slide or every slide in a folder; writes out_dir/slides.csv (one row per
    slide, status ok | error with the one-line error). A slide that fails is logged as one line and
    listed; the others are still done. Returns the slides.csv frame (callers decide the exit code,
    e.g. non-zero when no row is ok)."""
    import pandas as pd
    from tqdm.auto import tqdm

    rows = []
    paths = list_slides(path)
    for slide_path in tqdm(paths, desc="slides", unit="slide", disable=not progress or len(paths) < 2):
        try:
            rows.append(predict_slide(slide_path, out_dir=out_dir, progress=progress, **kw))
            log.info("slide %s: %d tissue tiles, score %.4f -> %s (%.1f tiles/s)", rows[-1]["slide"],
                     rows[-1]["tissue_tiles"], rows[-1]["score"], rows[-1]["label"], rows[-1]["tiles_per_s"])
        except Exception as e:  # one bad slide must not stop a folder; KeyboardInterrupt still does
            msg = " ".join(str(e).split()) or type(e).__name__
            if not isinstance(e, SlideError):
                msg = f"{type(e).__name__}: {msg}"
            if slide_path not in msg:
                msg = f"{slide_path}: {msg}"
            log.error("slide failed: %s", msg)
            rows.append({"slide": slide_stem(slide_path), "path": slide_path, "status": "error", "error": msg})
    frame = pd.DataFrame(rows, columns=list(dict.fromkeys(
        ["slide", "path", "status", "error", "tiles", "tissue_tiles", "score", "label", "seconds",
         "tiles_per_s"] + [k for r in rows for k in r])))
    io.makedirs(out_dir)
    io.write_csv(io.join(out_dir, "slides.csv"), frame)
    return frame


# ------------------------------------------------------------------------------------------ outputs

PALETTE = [(46, 139, 87), (200, 30, 30), (30, 90, 200), (230, 150, 20), (140, 60, 170), (20, 170, 170),
           (120, 120, 120), (200, 90, 150)]


def _tile_labels(probs: np.ndarray, classes: list[str], threshold: float) -> list[str]:
    if len(classes) == 2:
        return [classes[1] if p >= threshold else classes[0] for p in probs[:, 1]]
    return [classes[i] for i in probs.argmax(axis=1)]


def tiles_geojson(tiles, *, classes: list[str], threshold: float = 0.5):
    """A QuPath-importable FeatureCollection: one "tile" Feature per row (x, y, w, h, p_<class>...)."""
    import geojson

    pcols = [f"p_{c}" for c in classes]
    probs = tiles[pcols].to_numpy(np.float64) if len(tiles) else np.zeros((0, len(classes)))
    labels = _tile_labels(probs, classes, threshold)
    features = []
    xywh = tiles[["x", "y", "w", "h"]].to_numpy(np.int64)
    tissue = tiles["tissue"].to_numpy(np.float64) if "tissue" in tiles else np.ones(len(tiles))
    for (x, y, w, h), p, label, t in zip(xywh, probs, labels, tissue):
        x, y, w, h = int(x), int(y), int(w), int(h)
        ring = [[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]
        measurements = {col: float(v) for col, v in zip(pcols, p)}
        measurements["tissue"] = float(t)
        features.append(geojson.Feature(
            geometry=geojson.Polygon([ring]),
            properties={"objectType": "tile", "isLocked": True,
                        "classification": {"name": label, "color": list(PALETTE[classes.index(label) % len(PALETTE)])},
                        "measurements": measurements}))
    return geojson.FeatureCollection(features)


def contours_geojson(tiles, *, classes: list[str], threshold: float = 0.5):
    """Binary: the union of the tiles with P(classes[1]) >= threshold, one "annotation" Feature per
    connected region, measurements = its tile count and max/mean probability."""
    import geojson
    import shapely

    pos = tiles[tiles[f"p_{classes[1]}"] >= threshold] if len(tiles) else tiles
    features = []
    if len(pos):
        boxes = shapely.box(pos["x"], pos["y"], pos["x"] + pos["w"], pos["y"] + pos["h"])
        p = pos[f"p_{classes[1]}"].to_numpy(np.float64)
        for region in shapely.get_parts(shapely.union_all(boxes)):
            inside = shapely.intersects(region, shapely.points(pos["x"] + pos["w"] / 2, pos["y"] + pos["h"] / 2))
            geom = shapely.geometry.mapping(shapely.orient_polygons(region) if hasattr(shapely, "orient_polygons")
                                            else region)
            features.append(geojson.Feature(
                geometry=geojson.Polygon(_lists(geom["coordinates"])),
                properties={"objectType": "annotation",
                            "classification": {"name": classes[1], "color": list(PALETTE[1])},
                            "measurements": {"tiles": int(inside.sum()), "max_p": float(p[inside].max()),
                                             "mean_p": float(p[inside].mean())}}))
    return geojson.FeatureCollection(features)


def _lists(coords):
    if isinstance(coords, (list, tuple)) and coords and isinstance(coords[0], (int, float)):
        return [float(c) for c in coords]
    return [_lists(c) for c in coords]


def _dumps(obj) -> str:
    import geojson

    return geojson.dumps(obj) + "\n"


def _write_heatmap(path, grid, *, p_pos_col: str, dims, tile: int, stride: int, title: str,
                   thumbnail: np.ndarray | None = None) -> None:
    """P(positive) per grid cell (cells centred on their tiles), NaN = not tissue; matplotlib Figure
    API (no pyplot state); alone (grey background) or over the thumbnail (transparent background)."""
    import io as _io

    import matplotlib
    from matplotlib.figure import Figure

    w0, h0 = dims
    nrows, ncols = int(grid["row"].max()) + 1, int(grid["col"].max()) + 1
    heat = np.full((nrows, ncols), np.nan)
    heat[grid["row"].to_numpy(), grid["col"].to_numpy()] = grid[p_pos_col].to_numpy(np.float64)
    off = (tile - stride) / 2.0
    extent = (off, off + ncols * stride, off + nrows * stride, off)
    aspect = h0 / max(w0, 1)
    fig = Figure(figsize=(8.0, max(2.5, 8.0 * aspect * 0.9)), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["inferno"].with_extremes(
        bad=(0, 0, 0, 0) if thumbnail is not None else (0.85, 0.85, 0.85, 1.0))
    if thumbnail is not None:
        if max(thumbnail.shape[:2]) > 2048:  # display only: a figure this size shows no more
            f = 2048 / max(thumbnail.shape[:2])
            thumbnail = imageops.resize_array(thumbnail, (max(1, round(thumbnail.shape[0] * f)),
                                                          max(1, round(thumbnail.shape[1] * f))))
        ax.imshow(thumbnail, extent=(0, w0, h0, 0), interpolation="antialiased")
    im = ax.imshow(np.ma.masked_invalid(heat), cmap=cmap, vmin=0.0, vmax=1.0, extent=extent,
                   interpolation="nearest", alpha=0.5 if thumbnail is not None else 1.0)
    ax.set_xlim(0, max(w0, extent[1]))
    ax.set_ylim(max(h0, extent[2]), 0)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("x (level-0 px)")
    ax.set_ylabel("y (level-0 px)")
    fig.colorbar(im, ax=ax, label=p_pos_col.replace("p_", "P(") + ")", shrink=0.8)
    buf = _io.BytesIO()
    fig.savefig(buf, format="png")
    io.write_bytes(path, buf.getvalue())


# ------------------------------------------------------------------------------------------ training tiles

def annotation_file(slide_path) -> str | None:
    """<stem>.geojson, <stem>.json or <stem>.xml beside the slide, the first that exists."""
    folder, stem = io.dirname(slide_path), slide_stem(slide_path)
    for suffix in ANNOTATION_SUFFIXES:
        candidate = io.join(folder, stem + suffix) if folder else stem + suffix
        if io.exists(candidate):
            return candidate
    return None


def mask_file(slide_path) -> str | None:
    folder, stem = io.dirname(slide_path), slide_stem(slide_path)
    candidate = io.join(folder, stem + MASK_SUFFIX) if folder else stem + MASK_SUFFIX
    return candidate if io.exists(candidate) else None


def list_slide_tiles(input_dir, *, patch_px, patch_mpp, classes=None, background=None, label_fraction=None,
                     min_tissue=0.5, stride=None, mpp=None) -> list[dict]:
    """Labelled tissue tiles of every annotated slide in input_dir, for prepare (group = slide).

    A slide is used when <stem>.geojson / .json / .xml (QuPath GeoJSON or ASAP XML) or <stem>_mask.png
    (class indices, see histofold.annotations) lies beside it; the others are logged and skipped.
    Labels: histofold.annotations.label_tiles rules (annotations win over a mask when both exist);
    tiles labelled None are skipped. classes None = every annotation class name found (+ background).
    stride: in patch pixels at patch_mpp (None = patch_px).

    -> [{"slide", "path", "id": f"{stem}_{x}_{y}", "x", "y", "level", "read_px", "patch_px",
    "label_name", "tissue"}, ...] in slide order, then grid order; load_tile(path, x, y, level,
    read_px, patch_px) gives the pixels."""
    if classes is not None and background is not None and background not in classes:
        raise ValueError(f"background={background!r} is not one of classes={list(classes)}")
    slide_paths = list_slides(input_dir)
    work = []
    for sp in slide_paths:
        ann, msk = annotation_file(sp), mask_file(sp)
        if ann is None and msk is None:
            log.info("slides: %s has no annotation (<stem>.geojson/.xml or <stem>%s): skipped", sp, MASK_SUFFIX)
            continue
        work.append((sp, load_annotations(ann) if ann else None, msk))
    if not work:
        raise FileNotFoundError(f"no annotated slides in {input_dir}: put <stem>.geojson (QuPath) or "
                                f"<stem>.xml (ASAP) or <stem>{MASK_SUFFIX} beside each slide")
    if classes is None:
        from histofold.annotations import annotation_classes

        names = sorted({n for _, anns, _ in work if anns for n in annotation_classes(anns)})
        if any(anns is None for _, anns, _ in work) and not names:
            raise ValueError("slides with only class-index masks need classes= (index i -> classes[i])")
        classes = names + ([background] if background and background not in names else [])
    out = []
    for sp, anns, msk in work:
        stem = slide_stem(sp)
        with open_slide(sp, mpp=mpp) as slide:
            plan = read_plan(slide, patch_px=patch_px, patch_mpp=patch_mpp)
            stride_l0 = None if stride is None else max(1, int(round(stride * plan["tile_level0"] / patch_px)))
            mask, ds = tissue_mask(slide, max_side=mask_side(slide, plan["tile_level0"]))
            grid = tile_grid(slide, tile_level0=plan["tile_level0"], stride_level0=stride_l0, mask=mask,
                             mask_downsample=ds, min_tissue=min_tissue)
            w0 = slide.dimensions[0]
        tissue = grid[grid["is_tissue"]].reset_index(drop=True)
        if anns is not None:
            labels = label_tiles(tissue, anns, classes=classes, background=background,
                                 label_fraction=label_fraction)
        else:
            m = load_mask(msk)
            labels = label_tiles_from_mask(tissue, m, downsample=w0 / m.shape[1], classes=classes,
                                           background=background, label_fraction=label_fraction)
        n_before = len(out)
        for row, label in zip(tissue.itertuples(index=False), labels):
            if label is None:
                continue
            x, y = int(row.x), int(row.y)
            out.append({"slide": stem, "path": sp, "id": f"{stem}_{x}_{y}", "x": x, "y": y,
                        "level": int(plan["level"]), "read_px": int(plan["read_px"]),
                        "patch_px": int(patch_px), "label_name": label, "tissue": float(row.tissue)})
        log.info("slides: %s: %d labelled tiles of %d tissue tiles", stem, len(out) - n_before, len(tissue))
    return out
