"""Whole-slide prediction throughput: predict_slide's pipeline vs a naive loop, on the same slide and tiles.

    .venv/bin/python bench/slides.py [--cells=40] [--batch=64] [--threads=4] [--width=16] [--scenarios=10x,20x]
                                     [--repeats=2]

Builds a cells x cells slide of real PCam patches (../shared/data/pcam_jpeg/valid, cycled; ~8 % glass
cells) as a deflate-compressed tiled pyramidal TIFF in a temp dir, then per scenario times, over the
same tissue tiles (tiles/s after a warm-up; the four are interleaved, best of --repeats, because the
machine may be shared):

    reader alone   tile_dataset (threaded reads + the one resize, tf.data prefetch), no model
    model alone    histo_cnn forward (tf.function) on one batch repeated: the ceiling
    pipeline       keras_predict_fn(model)(tile_dataset(...)): what predict_slide runs
    naive loop     per batch: slide.read_region + resize per tile in Python, then model.predict(batch)
    predict_slide  the whole call: thumbnail, tissue mask, grid, pipeline, tiles.csv, PNGs, GeoJSON

Scenarios: 10x = a PCam-resolution slide (0.972 um/px, 3 levels): 96 px reads, no resize;
20x = each patch pixel doubled (0.486 um/px) with an Aperio-like pyramid (downsamples 1 and 4 only):
192 px reads at level 0, each resized to 96 (the usual 20x/40x case, where reads cost more).
Prints a table; not a test.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import fire  # noqa: E402
import numpy as np  # noqa: E402

from histofold import imageops, slides  # noqa: E402

PATCH_PX, PATCH_MPP = 96, 0.972


def machine() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = " ".join(open("/proc/loadavg").read().split()[:3]) if os.path.exists("/proc/loadavg") else "?"
    return f"{cores} usable cores | load avg {load} | {time.strftime('%Y-%m-%d %H:%M:%S')}"


def build_bench_slide(path: str, *, cells: int, scenario: str, seed: int = 0) -> dict:
    """A cells x cells grid of PCam patches (cycled), ~8 % glass cells; 10x or 20x (see module doc)."""
    from slide_fixtures import CELL, downsample2, glass, pcam_patches, write_tiff

    rng = np.random.default_rng(seed)
    pool = [a for _, a in pcam_patches(0, 150)] + [a for _, a in pcam_patches(1, 150)]
    repeat = 1 if scenario == "10x" else 2
    cell = CELL * repeat
    image = glass((cells * cell, cells * cell, 3), rng)
    is_glass = rng.random((cells, cells)) < 0.08
    k = 0
    for r in range(cells):
        for c in range(cells):
            if is_glass[r, c]:
                continue
            a = pool[k % len(pool)]
            k += 1
            if repeat > 1:
                a = np.repeat(np.repeat(a, repeat, axis=0), repeat, axis=1)
            image[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = a
    if scenario == "10x":
        pyramid, mpp = [image, downsample2(image), downsample2(downsample2(image))], PATCH_MPP
        write_tiff(path, pyramid, layout="ifd", mpp=mpp, tile=256)
    else:  # Aperio-like 20x: downsamples 1 and 4 only, so the 2x needed is a read at level 0 + resize
        import tifffile

        mpp = PATCH_MPP / 2
        levels = [image, downsample2(downsample2(image))]
        with tifffile.TiffWriter(path) as tw:
            for i, level in enumerate(levels):
                per_cm = 1e4 / (mpp * 4 ** i)
                tw.write(level, tile=(256, 256), photometric="rgb", compression="zlib", subfiletype=1 if i else 0,
                         resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")
    return {"path": path, "tissue_cells": int((~is_glass).sum()), "mpp": mpp}


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("nan")


def run_scenario(workdir: str, scenario: str, *, cells: int, batch: int, threads: int, width: int,
                 repeats: int) -> dict:
    import tensorflow as tf

    from histofold import models, tta

    t = time.perf_counter()
    info = build_bench_slide(os.path.join(workdir, f"bench_{scenario}.tif"), cells=cells, scenario=scenario)
    build_s = time.perf_counter() - t
    path = info["path"]
    with slides.open_slide(path) as s:
        plan = slides.read_plan(s, patch_px=PATCH_PX, patch_mpp=PATCH_MPP)
        mask, ds = slides.tissue_mask(s, max_side=slides.mask_side(s, plan["tile_level0"]))
        grid = slides.tile_grid(s, tile_level0=plan["tile_level0"], mask=mask, mask_downsample=ds)
        dims = s.dimensions
    tissue = grid[grid["is_tissue"]]
    xs, ys = tissue["x"].to_numpy(), tissue["y"].to_numpy()
    n = len(xs)
    level, read_px = plan["level"], plan["read_px"]
    model = models.build_model("histo_cnn", num_classes=2, image_size=PATCH_PX, width=width, seed=0)
    predict_fn = slides.keras_predict_fn(model, num_classes=2)

    def dataset(m=None):
        m = n if m is None else m
        return slides.tile_dataset(path, xs[:m], ys[:m], level=level, read_px=read_px, patch_px=PATCH_PX,
                                   batch_size=batch, threads=threads)

    out = {"scenario": scenario, "slide": f"{dims[0]}x{dims[1]} px, {info['mpp']:.3f} um/px",
           "plan": f"level {level}, read {read_px} px -> {PATCH_PX}", "tiles": n, "build_s": round(build_s, 1)}
    forward = tta.make_forward(model)
    xb = tf.cast(next(iter(dataset(batch)))[0], tf.float32)
    reps = max(1, n // batch)
    def reader():
        return sum(int(x.shape[0]) for x, _ in dataset())

    def model_alone():
        for _ in range(reps):
            forward(xb).numpy()
        return reps * batch

    def pipeline():
        out["p_pipe"] = predict_fn(dataset())[:, 1]
        return n

    def naive():  # opens the slide per pass, as tile_dataset does
        probs = []
        with slides.open_slide(path) as slide:
            for i in range(0, n, batch):
                tiles = [imageops.resize_array(slide.read_region(int(x), int(y), level, read_px, read_px), PATCH_PX)
                         for x, y in zip(xs[i:i + batch], ys[i:i + batch])]
                probs.append(model.predict(np.stack(tiles).astype(np.float32), verbose=0)[:, 0])
        out["p_naive"] = np.concatenate(probs)
        return n

    # warm-up: tracing, thread pools, the OS file cache, Keras' predict function
    forward(xb)
    predict_fn(dataset(batch))
    model.predict(xb.numpy(), verbose=0)
    methods = {"reader": reader, "model": model_alone, "pipeline": pipeline, "naive": naive}
    for name in methods:
        out[name] = 0.0
    for _ in range(repeats):  # interleaved, best of `repeats`: the machine is shared
        for name, fn in methods.items():
            t = time.perf_counter()
            count = fn()
            out[name] = max(out[name], rate(count, time.perf_counter() - t))
    p_pipe, p_naive = out.pop("p_pipe"), out.pop("p_naive")
    out["max_abs_diff"] = float(np.abs(p_pipe - p_naive).max())
    # the whole predict_slide call
    t = time.perf_counter()
    row = slides.predict_slide(path, predict_fn=predict_fn, classes=["0", "1"], patch_px=PATCH_PX,
                               patch_mpp=PATCH_MPP, out_dir=os.path.join(workdir, "out"), batch_size=batch,
                               threads=threads, progress=False)
    out["predict_slide"] = rate(row["tissue_tiles"], time.perf_counter() - t)
    out["speedup"] = out["pipeline"] / out["naive"]
    out["bound"] = "model" if out["reader"] > 1.5 * out["pipeline"] else "read"
    return out


def main(cells: int = 40, batch: int = 64, threads: int = 4, width: int = 16, scenarios: str = "10x,20x",
         repeats: int = 2):
    print(machine())
    print(f"histo_cnn width={width}, batch {batch}, {threads} reader threads, {cells}x{cells} cells of PCam patches")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_slides_") as workdir:
        for scenario in [s.strip() for s in str(scenarios).split(",") if s.strip()]:
            rows.append(run_scenario(workdir, scenario, cells=cells, batch=batch, threads=threads, width=width,
                                     repeats=repeats))
            r = rows[-1]
            print(f"  {scenario}: {r['slide']}, {r['plan']}, {r['tiles']} tissue tiles (built in {r['build_s']} s); "
                  f"pipeline vs naive max |dp| = {r['max_abs_diff']:.2g}")
    cols = ["reader", "model", "pipeline", "naive", "predict_slide"]
    print()
    print(f"| scenario | {' | '.join(c + ' tiles/s' for c in cols)} | pipeline / naive | bound |")
    print("|---" * (len(cols) + 3) + "|")
    for r in rows:
        print(f"| {r['scenario']} | " + " | ".join(f"{r[c]:.0f}" for c in cols)
              + f" | {r['speedup']:.2f}x | {r['bound']} |")
    return None


if __name__ == "__main__":
    fire.Fire(main)
