"""Small pyramidal slides built from real PCam patches, with their ground truth.

`build_slide(path, ...)` places 96x96 PCam JPEG patches (../shared/data/pcam_jpeg/valid/{0,1}) on a
known grid of cells, some cells left as glass (~(240, 240, 240) with a little noise), a known block of
tumour cells taken from class 1 and the rest from class 0, and writes a deflate-compressed tiled TIFF
with 2x downsampled levels (2x2 box means, what a scanner's pyramid is) and X/YResolution for `mpp`.

Layouts (what OpenSlide 4.0.1 does with them, see histofold/slides.py):
    "ifd"     levels as successive tiled IFDs -> OpenSlide generic-tiff, all levels, mpp from the tags
    "subifd"  levels as SubIFDs of level 0    -> OpenSlide sees level 0 only, so open_slide uses tifffile
    "ome"     OME-TIFF, SubIFDs, PhysicalSizeX and no resolution tags -> tifffile, mpp from the OME XML
    "strip"   one untiled level               -> OpenSlide refuses it, tifffile reads it

Patches are the first tissue-rich ones in file-name order (>= 70 % of pixels with min(R, G, B) < 200,
a criterion independent of the tissue detector under test): many PCam patches are mostly fat or glass,
and a cell meant as tissue has to be tissue. Tests skip where the PCam folder is absent.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PCAM_VALID = (ROOT.parent / "shared" / "data" / "pcam_jpeg" / "valid").resolve()
CELL = 96
GLASS_RGB = 240
MPP = 0.972

DEFAULT_GLASS = ((0, 0), (0, 1), (0, 2), (1, 0), (2, 3), (5, 7), (4, 7), (5, 6))  # (row, col); (2, 3) is enclosed
DEFAULT_TUMOUR = (2, 4, 5, 7)  # rows 2..4, cols 4..6 (half-open row0, col0, row1, col1)


@dataclass
class SlideTruth:
    path: str
    rows: int                    # grid cells, including the partial cells of a margin
    cols: int
    cell: int
    mpp: float | None
    image: np.ndarray            # level 0, (H, W, 3) uint8
    files: dict = field(default_factory=dict)   # (row, col) -> patch file, for the patch cells
    glass: np.ndarray = None     # (rows, cols) bool: no patch here (margin cells too)
    label: np.ndarray = None     # (rows, cols) int: 0 / 1 for patch cells, -1 for glass
    levels: list = field(default_factory=list)  # every level's array

    def patch(self, row: int, col: int) -> np.ndarray:
        """The pixels of cell (row, col) at level 0 (a partial margin cell padded with white)."""
        out = np.full((self.cell, self.cell, 3), 255, np.uint8)
        part = self.image[row * self.cell:(row + 1) * self.cell, col * self.cell:(col + 1) * self.cell]
        out[:part.shape[0], :part.shape[1]] = part
        return out


def pcam_patches(label: int, n: int, *, min_dark: float = 0.7, skip: int = 0) -> list[tuple[str, np.ndarray]]:
    """The first n tissue-rich PCam validation patches of one class, in file-name order (after `skip`)."""
    from PIL import Image

    folder = PCAM_VALID / str(label)
    if n <= 0:
        return []
    if not folder.is_dir():
        pytest.skip(f"real fixture {folder} not present")
    out = []
    for f in sorted(folder.glob("*.jpg")):
        with Image.open(f) as im:
            a = np.asarray(im.convert("RGB"))
        if a.shape == (CELL, CELL, 3) and (a.min(axis=-1) < 200).mean() >= min_dark:
            out.append((str(f), a))
            if len(out) == n + skip:
                return out[skip:]
    pytest.skip(f"only {len(out) - skip} tissue-rich patches of class {label} in {folder}, need {n}")


def glass(shape, rng) -> np.ndarray:
    return np.clip(np.rint(rng.normal(GLASS_RGB, 2.0, size=shape)), 0, 255).astype(np.uint8)


def downsample2(a: np.ndarray) -> np.ndarray:
    h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
    return np.rint(a[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))).astype(np.uint8)


def build_slide(path, *, rows: int = 6, cols: int = 8, glass_cells=DEFAULT_GLASS, tumour=DEFAULT_TUMOUR,
                levels: int = 3, layout: str = "ifd", mpp: float | None = MPP, margin: int = 0,
                tile: int = 128, seed: int = 0, repeat: int = 1, skip: int | tuple = 0) -> SlideTruth:
    """Write a pyramidal TIFF of rows x cols PCam cells (+ `margin` px of glass right and bottom).

    repeat: each patch pixel becomes repeat x repeat pixels (a higher-resolution scan of the same
    tissue; cells are then CELL*repeat px and mpp should be divided by repeat).
    skip: patches to pass over before the first one used, per class ((class 0, class 1), or one number
    for both), so several slides can hold different patches."""
    path = str(path)
    rng = np.random.default_rng(seed)
    glass_set = {tuple(c) for c in glass_cells}
    r0, c0, r1, c1 = tumour
    is_tumour = np.zeros((rows, cols), bool)
    is_tumour[r0:r1, c0:c1] = True
    patch_cells = [(r, c) for r in range(rows) for c in range(cols) if (r, c) not in glass_set]
    need1 = sum(is_tumour[r, c] for r, c in patch_cells)
    skip0, skip1 = (skip, skip) if isinstance(skip, int) else skip
    ones = iter(pcam_patches(1, need1, skip=skip1))
    zeros = iter(pcam_patches(0, len(patch_cells) - need1, skip=skip0))
    cell = CELL * repeat
    height, width = rows * cell + margin, cols * cell + margin
    image = glass((height, width, 3), rng)
    files = {}
    for r, c in patch_cells:
        f, a = next(ones) if is_tumour[r, c] else next(zeros)
        if repeat > 1:
            a = np.repeat(np.repeat(a, repeat, axis=0), repeat, axis=1)
        image[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = a
        files[(r, c)] = f
    grid_rows = rows + (1 if margin else 0)
    grid_cols = cols + (1 if margin else 0)
    is_glass = np.ones((grid_rows, grid_cols), bool)
    label = np.full((grid_rows, grid_cols), -1, int)
    for r, c in patch_cells:
        is_glass[r, c] = False
        label[r, c] = int(is_tumour[r, c])
    pyramid = [image]
    for _ in range(levels - 1):
        pyramid.append(downsample2(pyramid[-1]))
    write_tiff(path, pyramid, layout=layout, mpp=mpp, tile=tile)
    return SlideTruth(path=path, rows=grid_rows, cols=grid_cols, cell=cell, mpp=mpp, image=image, files=files,
                      glass=is_glass, label=label, levels=pyramid)


def write_tiff(path: str, pyramid: list[np.ndarray], *, layout: str = "ifd", mpp: float | None = MPP,
               tile: int = 128) -> None:
    import tifffile

    def res(i):
        if mpp is None or layout == "ome":
            return {}
        per_cm = 1e4 / (mpp * 2 ** i)
        return {"resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"}

    common = {"photometric": "rgb", "compression": "zlib"}
    if layout == "strip":
        tifffile.imwrite(path, pyramid[0], **common, **res(0))
        return
    with tifffile.TiffWriter(path, ome=(layout == "ome")) as tw:
        if layout == "ifd":
            for i, level in enumerate(pyramid):
                tw.write(level, tile=(tile, tile), subfiletype=1 if i else 0, **common, **res(i))
        elif layout in ("subifd", "ome"):
            meta = {"axes": "YXS"}
            if layout == "ome" and mpp is not None:
                meta.update(PhysicalSizeX=mpp, PhysicalSizeY=mpp, PhysicalSizeXUnit="µm", PhysicalSizeYUnit="µm")
            tw.write(pyramid[0], tile=(tile, tile), subifds=len(pyramid) - 1, metadata=meta, **common, **res(0))
            for i, level in enumerate(pyramid[1:], start=1):
                tw.write(level, tile=(tile, tile), subfiletype=1, **common, **res(i))
        else:
            raise ValueError(f"layout={layout!r}: ifd | subifd | ome | strip")


def geojson_square(x0, y0, x1, y1, name: str) -> dict:
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1],
                                                                              [x0, y1], [x0, y0]]]},
            "properties": {"objectType": "annotation", "classification": {"name": name, "color": [200, 0, 0]}}}


def asap_xml(polygons: list[tuple[str, list[tuple[float, float]]]]) -> str:
    """ASAP/Camelyon XML with one <Annotation> per (group, points)."""
    parts = ['<?xml version="1.0"?>', "<ASAP_Annotations>", "<Annotations>"]
    for i, (group, points) in enumerate(polygons):
        parts.append(f'<Annotation Name="Annotation {i}" Type="Polygon" PartOfGroup="{group}" Color="#F4FA58">')
        parts.append("<Coordinates>")
        parts += [f'<Coordinate Order="{k}" X="{x}" Y="{y}" />' for k, (x, y) in enumerate(points)]
        parts.append("</Coordinates></Annotation>")
    parts += ["</Annotations>", "<AnnotationGroups>",
              *[f'<Group Name="{g}" PartOfGroup="None" Color="#64FE2E"><Attributes /></Group>'
                for g in sorted({g for g, _ in polygons})],
              "</AnnotationGroups>", "</ASAP_Annotations>"]
    return "\n".join(parts)
