"""Whole-slide inference against patch inference with the same model, on real PCam patches.

    python bench/slide_quality.py --run=RUNS/quality0 [--slides=4 --rows=8 --cols=10]

Builds pyramidal TIFF slides from PCam validation patches on a known grid (tests/slide_fixtures.py: half
the slides with a block of tumour patches, half without, some glass cells), maps them with
`predict.py --slides`, and predicts the very same patch files with `predict.py --input`. Prints the tile
ROC AUC (tiles.csv against the patch each tile holds) beside the patch AUC, and every slide's score, so
one sees that a slide read through OpenSlide at the training resolution gives what the patches give,
and that slides with tumour score above slides without.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]


def main(*, run: str, slides: int = 4, rows: int = 6, cols: int = 8, tta: int = 8, workdir: str = ""):
    """Map `slides` synthetic-layout slides of real PCam patches with `run` and compare with patch predictions.

    Args:
        run: a finished run directory (runs/<name>), e.g. the one bench/quality.py trained.
        slides: number of slides (even: half with a tumour block).
        rows: grid rows per slide.
        cols: grid columns per slide.
        tta: dihedral TTA for both paths.
        workdir: where slides and outputs go (default a temp dir, kept).
    """
    import numpy as np
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    from slide_fixtures import CELL, build_slide

    workdir = workdir or tempfile.mkdtemp(prefix="histofold-slides-")
    folder, patches = os.path.join(workdir, "slides"), os.path.join(workdir, "patches")
    os.makedirs(folder, exist_ok=True)
    truths, skip = [], [0, 0]  # patches used so far per class: every slide holds different patches
    for i in range(slides):
        tumour = (1, 2, rows - 1, cols // 2 + 1) if i % 2 == 0 else (0, 0, 0, 0)
        glass = [(0, 0), (0, 1), (1, 0), (rows - 1, cols - 1)]
        truth = build_slide(os.path.join(folder, f"slide{i}.tif"), rows=rows, cols=cols, tumour=tumour,
                            glass_cells=glass, skip=tuple(skip), seed=i)
        for k in (0, 1):
            skip[k] += int((truth.label == k).sum())
        truths.append(truth)
        for (r, c), f in truth.files.items():
            d = os.path.join(patches, str(truth.label[r, c]))
            os.makedirs(d, exist_ok=True)
            os.symlink(f, os.path.join(d, f"s{i}_{r}_{c}.jpg"))
    common = [f"--runs={os.path.abspath(run)}", f"--tta={tta}"]
    subprocess.run([sys.executable, os.path.join(ROOT, "predict.py"), f"--slides={folder}",
                    f"--out_dir={workdir}/maps", *common], check=True, cwd=workdir, stdout=sys.stderr)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "predict.py"), f"--input={patches}",
                          f"--predictions={workdir}/patches.csv", *common], check=True, cwd=workdir,
                         capture_output=True, text=True)
    patch = pd.read_csv(f"{workdir}/patches.csv")
    patch_auc = roc_auc_score(patch["label"], patch.filter(like="p_").iloc[:, -1])
    ys, ps, rows_out = [], [], []
    table = pd.read_csv(f"{workdir}/maps/slides.csv")
    for i, truth in enumerate(truths):
        tiles = pd.read_csv(f"{workdir}/maps/slide{i}/tiles.csv")
        tiles = tiles[tiles["is_tissue"]]
        label = truth.label[tiles["y"].to_numpy() // CELL, tiles["x"].to_numpy() // CELL]
        keep = label >= 0
        ys += list(label[keep])
        ps += list(tiles.filter(like="p_").iloc[:, -1].to_numpy()[keep])
        row = table.iloc[i]
        rows_out.append((f"slide{i}", bool((truth.label == 1).any()), int(row["tissue_tiles"]), float(row["score"])))
    tile_auc = roc_auc_score(ys, ps)
    print(f"\npatches: {len(patch)} (predict.py --input)  ROC AUC {patch_auc:.4f}")
    print(f"tiles:   {len(ys)} tissue tiles of {len(truths)} slides (predict.py --slides)  ROC AUC {tile_auc:.4f}")
    print(f"{'slide':8s} {'tumour':>7s} {'tissue tiles':>13s} {'score (top-10 mean)':>20s}")
    for name, tumour, n, score in rows_out:
        print(f"{name:8s} {str(tumour):>7s} {n:13d} {score:20.4f}")
    tum = [s for _, t, _, s in rows_out if t]
    normal = [s for _, t, _, s in rows_out if not t]
    print(f"every tumour slide scores above every slide without: {min(tum) > max(normal)}")
    return {"patch_auc": patch_auc, "tile_auc": tile_auc}


if __name__ == "__main__":
    import fire

    fire.Fire(main)
