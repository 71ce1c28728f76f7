"""Slide annotations -> tile labels: QuPath GeoJSON and ASAP/Camelyon XML polygons, and class-index masks.

Every coordinate is in level-0 pixels of the slide (what QuPath exports and ASAP stores).

    load_annotations(path)        -> [(shapely geometry, class name), ...]   (ValueError naming a bad file)
    label_tiles(tiles, annotations, classes=, background=, label_fraction=)  -> one label (or None) per tile
    load_mask(path) / label_tiles_from_mask(tiles, mask, downsample, ...)    (`<stem>_mask.png`)

Label rules (one definition for GeoJSON, XML and masks):
  - label_fraction None (centre rule): the class of the annotation that covers the tile centre; where
    several do (nested regions), the smallest one wins, it is the most specific. No annotation at the
    centre -> `background`.
  - label_fraction f: per class, the fraction of the tile covered by the union of that class's
    annotations; the best class wins when it covers >= f of the tile. A tile no annotation touches gets
    `background`; a tile that is touched but covered less than f is ambiguous and gets None (skipped),
    so partly annotated border tiles never become background examples.
  - `background=None` skips the tiles under no annotation (None) instead of labelling them.
Annotations whose name is not in `classes` are ignored (logged once per name), so an ASAP exclusion
group or a QuPath "Region*" annotation does not become a class by accident.

Mask images: a single-channel PNG whose pixel values are indices into `classes` (0 = classes[0], ...),
at any downsample of level 0 (inferred from the widths); values >= len(classes) (e.g. 255) mean "not
labelled" and fall back to `background` like tiles under no annotation.
"""
from __future__ import annotations

import io as _io
import json
import logging
import xml.etree.ElementTree as ET

import numpy as np

from histofold import io

log = logging.getLogger("histofold")

AREAL = ("Polygon", "MultiPolygon")
ASAP_AREA_TYPES = ("polygon", "spline", "rectangle", "polyline")  # PointSet / Dot carry no area


# ------------------------------------------------------------------------------------------ loading

def load_annotations(path) -> list[tuple]:
    """(geometry, class name) pairs of every areal annotation in a QuPath GeoJSON or ASAP XML file.

    GeoJSON: a FeatureCollection, a Feature, a bare geometry or a JSON list of features (older QuPath);
    the name is properties.classification.name (or a plain string classification, or properties.name);
    unclassified annotations get "". ASAP XML: every <Annotation> of type Polygon/Spline/Rectangle with
    its <Coordinate X= Y=> points in Order; the name is PartOfGroup (else Name). Points, lines and
    empty shapes are dropped; self-intersecting polygons are repaired (shapely.make_valid).
    Raises ValueError naming the file when it cannot be read or parsed."""
    try:
        data = io.read_bytes(path)
    except OSError as e:
        raise ValueError(f"annotation file {path}: cannot be read ({e})") from None
    head = data.lstrip()[:1]
    try:
        if str(path).lower().endswith(".xml") or head == b"<":
            out = _from_asap_xml(data)
        else:
            out = _from_geojson(json.loads(data))
    except (ValueError, TypeError, KeyError, AttributeError, ET.ParseError) as e:
        raise ValueError(f"annotation file {path}: not valid QuPath GeoJSON or ASAP XML "
                         f"({type(e).__name__}: {e})") from None
    return out


def _from_geojson(obj) -> list[tuple]:
    import shapely.geometry

    if isinstance(obj, dict) and obj.get("type") == "FeatureCollection":
        features = obj.get("features")
    elif isinstance(obj, dict) and obj.get("type") == "Feature":
        features = [obj]
    elif isinstance(obj, dict) and "coordinates" in obj:
        features = [{"type": "Feature", "geometry": obj, "properties": {}}]
    elif isinstance(obj, list):
        features = obj
    else:
        raise ValueError("expected a FeatureCollection, a Feature or a list of features")
    if not isinstance(features, list):
        raise ValueError("'features' is not a list")
    out = []
    for feature in features:
        geometry = (feature or {}).get("geometry")
        if not geometry:
            continue
        geom = _areal(shapely.geometry.shape(geometry))
        if geom is not None:
            out.append((geom, _geojson_name(feature.get("properties") or {})))
    return out


def _geojson_name(props: dict) -> str:
    cls = props.get("classification")
    if isinstance(cls, dict) and cls.get("name") is not None:
        return str(cls["name"])
    if isinstance(cls, str):
        return cls
    return str(props.get("name") or "")


def _from_asap_xml(data: bytes) -> list[tuple]:
    import shapely.geometry

    root = ET.fromstring(data)
    out = []
    for ann in root.iter("Annotation"):
        kind = (ann.get("Type") or "Polygon").lower()
        if kind not in ASAP_AREA_TYPES:
            continue
        coords = []
        for c in ann.iter("Coordinate"):
            order = float(_num(c.get("Order", len(coords))))
            coords.append((order, float(_num(c.get("X"))), float(_num(c.get("Y")))))
        coords.sort(key=lambda t: t[0])
        points = [(x, y) for _, x, y in coords]
        if kind == "rectangle" and len(points) == 2:
            (x0, y0), (x1, y1) = points
            points = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
        if len(points) < 3:
            continue
        geom = _areal(shapely.geometry.Polygon(points))
        if geom is not None:
            group = ann.get("PartOfGroup")
            name = group if group not in (None, "", "None") else (ann.get("Name") or "")
            out.append((geom, str(name)))
    return out


def _num(value) -> str:
    if value is None:
        raise ValueError("a Coordinate lacks X or Y")
    return str(value).replace(",", ".")  # some ASAP exports write decimal commas


def _areal(geom):
    """The polygonal part of a geometry (repaired), or None when it has no area."""
    import shapely

    if geom is None or geom.is_empty:
        return None
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
    if geom.geom_type not in AREAL:
        parts = [g for g in shapely.get_parts(geom) if g.geom_type in AREAL]
        if not parts:
            return None
        geom = shapely.union_all(parts)
    return geom if geom.area > 0 else None


# ------------------------------------------------------------------------------------------ labelling

def annotation_classes(annotations) -> list[str]:
    """The distinct class names of some annotations, sorted ("" = unclassified is left out)."""
    return sorted({name for _, name in annotations if name})


def label_tiles(tiles, annotations, *, classes: list[str] | None, background: str | None,
                label_fraction: float | None = None) -> list[str | None]:
    """One label (or None = skip) per row of `tiles` (columns x, y, w, h in level-0 px); rules in the
    module docstring. classes None = every annotated class name."""
    import shapely

    n = len(tiles)
    if n == 0:
        return []
    keep = _known(annotations, classes)
    if not keep:
        return [background] * n
    x = tiles["x"].to_numpy(np.float64)
    y = tiles["y"].to_numpy(np.float64)
    w = tiles["w"].to_numpy(np.float64)
    h = tiles["h"].to_numpy(np.float64)
    labels: list[str | None] = [background] * n
    if label_fraction is None:
        geoms = np.array([g for g, _ in keep], dtype=object)
        names = [name for _, name in keep]
        tree = shapely.STRtree(geoms)
        tile_i, geom_i = tree.query(shapely.points(x + w / 2, y + h / 2), predicate="intersects")
        area = shapely.area(geoms)[geom_i]
        order = np.lexsort((area, tile_i))            # per tile, smallest covering annotation first
        tile_i, geom_i = tile_i[order], geom_i[order]
        first = np.unique(tile_i, return_index=True)[1]
        for t, g in zip(tile_i[first], geom_i[first]):
            labels[int(t)] = names[int(g)]
        return labels
    if not 0 < label_fraction <= 1:
        raise ValueError(f"label_fraction={label_fraction} must lie in (0, 1]")
    names = sorted({name for _, name in keep})
    parts, part_label = [], []
    for k, name in enumerate(names):                  # per class union, so overlaps are not counted twice
        union = shapely.union_all([g for g, nm in keep if nm == name])
        for p in shapely.get_parts(union):
            parts.append(p)
            part_label.append(k)
    parts = np.array(parts, dtype=object)
    part_label = np.asarray(part_label)
    boxes = shapely.box(x, y, x + w, y + h)
    tile_i, part_i = shapely.STRtree(parts).query(boxes, predicate="intersects")
    cover = np.zeros((n, len(names)))
    if len(tile_i):
        inter = shapely.area(shapely.intersection(boxes[tile_i], parts[part_i]))
        np.add.at(cover, (tile_i, part_label[part_i]), inter)
    cover /= (w * h)[:, None]
    best = cover.argmax(axis=1)
    best_cover = cover[np.arange(n), best]
    for t in range(n):
        if best_cover[t] >= label_fraction - 1e-9:
            labels[t] = names[best[t]]
        elif cover[t].sum() > 1e-9:
            labels[t] = None                          # partly annotated: ambiguous, skipped
    return labels


def _known(annotations, classes) -> list[tuple]:
    if classes is None:
        return [(g, name) for g, name in annotations if name]
    allowed = set(classes)
    unknown = sorted({name for _, name in annotations if name not in allowed})
    for name in unknown:
        log.info("annotations: ignoring %r (not one of the classes %s)", name, list(classes))
    return [(g, name) for g, name in annotations if name in allowed]


# ------------------------------------------------------------------------------------------ masks

def load_mask(path) -> np.ndarray:
    """A class-index mask image -> (H, W) uint8 (palette images keep their indices). ValueError naming it."""
    from PIL import Image

    try:
        with Image.open(_io.BytesIO(io.read_bytes(path))) as im:
            if im.mode not in ("L", "P", "1", "I", "I;16"):
                raise ValueError(f"mode {im.mode}: a mask must be single-channel class indices")
            arr = np.asarray(im)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"mask file {path}: not a readable class-index image ({e})") from None
    if arr.max(initial=0) > 255:
        raise ValueError(f"mask file {path}: values above 255 are not class indices")
    return arr.astype(np.uint8)


def label_tiles_from_mask(tiles, mask: np.ndarray, *, downsample: float, classes: list[str],
                          background: str | None, label_fraction: float | None = None) -> list[str | None]:
    """The label rules of `label_tiles` on a class-index mask at `downsample` (level-0 px per mask px)."""
    n = len(tiles)
    out: list[str | None] = [background] * n
    hm, wm = mask.shape[:2]
    k = len(classes)
    for t, (x, y, w, h) in enumerate(tiles[["x", "y", "w", "h"]].to_numpy(np.float64)):
        if label_fraction is None:
            cx, cy = int((x + w / 2) / downsample), int((y + h / 2) / downsample)
            if 0 <= cx < wm and 0 <= cy < hm and mask[cy, cx] < k:
                out[t] = classes[int(mask[cy, cx])]
            continue
        x0, y0 = int(round(x / downsample)), int(round(y / downsample))
        x1 = max(int(round((x + w) / downsample)), x0 + 1)
        y1 = max(int(round((y + h) / downsample)), y0 + 1)
        window = mask[max(y0, 0):min(y1, hm), max(x0, 0):min(x1, wm)]
        counts = np.bincount(window.ravel(), minlength=256)[:k]
        if counts.sum() == 0:
            continue                                   # nothing labelled here -> background
        best = int(counts.argmax())
        if counts[best] >= label_fraction * (x1 - x0) * (y1 - y0) - 1e-9:
            out[t] = classes[best]
        else:
            out[t] = None
    return out
