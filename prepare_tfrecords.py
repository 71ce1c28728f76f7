"""Data stage entry point: dataset -> QC -> folds/folds.csv -> k-fold TFRecord shards (see histofold/prepare.py)."""
from __future__ import annotations

from histofold.cli import run_cli, setup_logging


def main(*, source="synthetic", input=None, out="tfrecords", folds_dir="folds", folds=5, seed=42,
         encoding="auto", jpeg_quality=95, resize=None, shard_mb=100.0, workers=None, cache_mb=2000.0,
         groups=None, classes=(), group_regex=None, test_input=None, holdout=0.0, drop_blank=False,
         near_dup=4, dedupe=False, strict_labels=False, stain_norm="none", stain_ref=None, mpp=None,
         verify=False, overwrite=False, runner="local", beam_args="", log_level="info", **source_options):
    r"""Write leakage-safe k-fold TFRecords: QC every image, decide folds once, shard resumably.

    Every input is either written or listed in <folds_dir>/rejects.csv with its reason, and the
    summary checks inputs = written + rejected. Rerunning the same command resumes an interrupted
    run (finished shards are kept) and is a no-op on a complete directory; two identical runs write
    byte-identical shards.

    Examples:
      python prepare_tfrecords.py --source=hcd --input=data/hcd --out=tfrecords --folds=5
      python prepare_tfrecords.py --source=pcam --input=data/pcam --test_split=valid --drop_blank
      python prepare_tfrecords.py --source=folder --input=pcam_jpeg/train --test_input=pcam_jpeg/valid
      python prepare_tfrecords.py --source=folder --input=lc25000/lung_image_sets --classes=lung_aca,lung_n,lung_scc --resize=224
      python prepare_tfrecords.py --source=slides --input=slides/ --mpp=0.972 --resize=96
      python prepare_tfrecords.py --source=synthetic --count=400 --test_count=100 --image_size=64

    Args:
      source: dataset adapter: hcd | pcam | folder | chaoyang | csv | slides | synthetic.
      input: dataset root. hcd: the folder with train_labels.csv, train/ and test/. pcam: the folder
        of the camelyonpatch_level_2_split_*.h5[.gz] files. folder: a class-per-folder tree.
        chaoyang: the folder with train.json and test.json. csv: a folder or a CSV file. slides: a
        folder of whole-slide images with annotations beside them. Not needed for synthetic.
      out: output folder (local or gs://) for the shards, manifest.json, test_ids.csv and
        sample_submission.csv.
      folds_dir: folder for folds.csv, class_balance.csv, rejects.csv and duplicates.csv.
      folds: number of folds (>= 2), stratified by label and grouped (slide, patient or duplicate
        cluster).
      seed: fold shuffling seed; the same seed and inputs always give the same folds.
      encoding: auto | raw | png | jpeg. auto stores raw pixels up to 128 px (lossless, free to
        decode; 27.6 KB per 96 px patch) and JPEG above (a 768 px raw image is 1.7 MB).
      jpeg_quality: 1..100, for jpeg (4:4:4 chroma).
      resize: store every image at resize x resize pixels (antialiased bilinear). Without it, images
        whose size differs from the dataset's majority size are rejected. Old name: --size.
      shard_mb: target shard size in MB (the record count per shard follows from it).
      workers: worker processes for loading, hashing and encoding (default: all cores).
      cache_mb: keep the encoded images of pass 1 in memory when they fit in this many MB (else
        they are loaded again in pass 2).
      groups: hcd: a CSV of id,group (e.g. slide ids) so a group never straddles folds.
      classes: folder/csv/slides: comma-separated classes to keep, in this order, e.g.
        lung_aca,lung_n,lung_scc.
      group_regex: folder: a regex on the relative path whose first capture group is the group,
        e.g. the BreakHis patient: 'SOB_._[A-Z]+-(\d+-\d+)'.
      test_input: folder: a second class-per-folder tree written as (labeled) test shards.
      holdout: for datasets without a test set: hold out this fraction of the labeled images
        (stratified, never sharing a group with the folds) as a labeled test set, e.g. 0.2.
      drop_blank: reject blank patches (glass, black frames) from train instead of only flagging
        them in folds.csv's blank column. Test images are never dropped.
      near_dup: group near duplicates by a d4-invariant perceptual hash (flips and rotations
        included) within this many bits of 64; -1 = exact (pixel-identical) duplicates only.
        Duplicates are kept and share one group, so a cluster never straddles folds.
      dedupe: keep one train image per exact-duplicate cluster; the others become rejects.
      strict_labels: fail on conflicting duplicate label rows instead of rejecting every copy.
      stain_norm: none | reinhard | macenko: normalize every stored image's stain toward a reference
        fitted on the training images (or --stain_ref); the parameters go into manifest.json and
        every later input (test shards, predict.py --input, slides) gets the same transform.
      stain_ref: an image file to fit the stain reference on instead of the training images.
      mpp: microns per pixel of the input images (PCam and Kaggle HCD are known: 0.972); recorded
        in the manifest (scaled by --resize) so whole-slide inference reads at the same resolution.
        slides: the resolution to cut tiles at.
      verify: after writing, re-read every shard: sha256, counts, ids vs folds.csv, image sizes.
      overwrite: replace folds.csv and shards made with different settings (otherwise an error).
      runner: local (a process pool) | beam (Apache Beam; pip install -r requirements-beam.txt).
      beam_args: with --runner=beam: pipeline options, e.g. '--runner=DataflowRunner --project=P
        --region=R --temp_location=gs://b/tmp' (default: the DirectRunner on this machine).
      log_level: debug | info | warning | error.
      **source_options: adapter options. synthetic: --count --image_size --num_classes --test_count.
        pcam: --test_split. folder: --class_depth --include. csv: --csv --path_col --label_col
        --group_col --id_col --root --test_csv. slides: --label_fraction --background --min_tissue
        --stride.

    Returns:
      The summary: inputs, written, rejected, train, test, duplicates, blank, output paths.
    """
    flags = dict(locals())
    from histofold.config import PrepareConfig

    config = PrepareConfig.from_flags(**{k: v for k, v in flags.items() if k != "source_options"}, **source_options)
    setup_logging(config.log_level)
    from histofold.prepare import prepare

    return prepare(config)


if __name__ == "__main__":
    from histofold import sources

    run_cli(main, extra_flags={o for s in sources.SOURCES.values() for o in s.options})
