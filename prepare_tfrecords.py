"""Data stage entry point: dataset -> QC -> folds/folds.csv -> k-fold TFRecord shards (see histofold/prepare.py)."""
from __future__ import annotations

from histofold.cli import run_cli, setup_logging, to_list


def main(*, source="synthetic", input=None, out="tfrecords", folds_dir="folds", folds=5, seed=42,
         encoding="auto", jpeg_quality=95, size=None, shard_mb=100, workers=None, groups=None, classes=None,
         group_regex=None, test_input=None, holdout=0.0, drop_blank=False, near_dup=True, dedupe=False, verify=False,
         overwrite=False, **source_options):
    r"""Write leakage-safe k-fold TFRecords: QC every image, decide folds once, shard resumably.

    Every input is either written or listed in <folds_dir>/rejects.csv with its reason, and the summary
    checks `inputs = written + rejected`. Rerunning the same command resumes an interrupted run (finished
    shards are kept) and is a no-op on a complete directory.

    Args:
      source: dataset adapter: hcd | pcam | folder | chaoyang | csv | synthetic.
      input: dataset root (hcd: dir with train_labels.csv, train/, test/; pcam: dir of the h5 files;
        folder: class-per-folder tree; chaoyang: dir with train.json/test.json; csv: dir or CSV file).
        Not needed for synthetic.
      out: output dir (local or gs://) for *.tfrec, manifest.json, test_ids.csv, sample_submission.csv.
      folds_dir: dir for folds.csv, class_balance.csv, rejects.csv, duplicates.csv.
      folds: number of folds (>= 2), stratified by label and grouped (slide/patient/duplicate cluster).
      seed: fold shuffling seed; the same seed and inputs always give the same folds.
      encoding: auto | raw | png | jpeg. auto: raw up to 128 px (lossless, free to decode; 27.6 KB
        per 96 px patch vs png 21.1 KB at 0.8 ms/img to encode), jpeg above (768 px raw is 1.7 MB).
      jpeg_quality: 1..100, for jpeg (4:4:4 chroma).
      size: resize every image to size x size pixels. Without it, images whose size differs from the
        dataset's majority size are rejected.
      shard_mb: target shard size in MB (the record count per shard follows from it).
      workers: worker processes for loading/hashing/encoding (default: all cores).
      groups: hcd: CSV of id,group (e.g. slide ids) so a group never straddles folds.
      classes: folder: comma-separated class folders to keep, e.g. lung_aca,lung_n,lung_scc.
      group_regex: folder: regex on the relative path whose first capture group is the group
        (BreakHis patient: 'SOB_._[A-Z]+-(\d+-\d+)').
      test_input: folder: a second class-per-folder tree written as (labeled) test shards.
      holdout: for datasets without a test set: hold out this fraction of the labeled images
        (stratified, never sharing a group with the folds) as a labeled test set, e.g. 0.2.
      drop_blank: reject blank patches (glass, black frames) from train instead of only flagging them
        in folds.csv's `blank` column. Test images are never dropped.
      near_dup: group near duplicates (d4-invariant perceptual hash, flips/rotations included):
        True = within 4 bits of 64, an int = that Hamming radius, False = exact duplicates only.
        Duplicates are kept and share one group, so a cluster never straddles folds.
      dedupe: keep one train image per exact (pixel-identical) duplicate cluster; the others become
        rejects ('exact duplicate of <id>').
      verify: after writing, re-read every shard: sha256, counts, ids vs folds.csv, image sizes.
      overwrite: replace existing folds.csv/shards made with different settings (otherwise an error).
      **source_options: adapter options, e.g. synthetic --count --image_size --num_classes --test_count;
        pcam --test_split; csv --csv --path_col --label_col --group_col --id_col --root --test_csv.

    Examples:
      python prepare_tfrecords.py --source=hcd --input=data/hcd --out=tfrecords --folds=5
      python prepare_tfrecords.py --source=pcam --input=data/pcam --test_split=valid --drop_blank
      python prepare_tfrecords.py --source=folder --input=data/lc25000/lung_image_sets \
          --classes=lung_aca,lung_n,lung_scc --size=384 --encoding=jpeg
      python prepare_tfrecords.py --source=synthetic --count=400 --test_count=100 --image_size=64

    Returns:
      The summary dict: inputs, written, rejected, train, test, duplicates, blank, output paths.
    """
    from histofold.prepare import PrepareConfig, prepare

    setup_logging()
    options = {k: v for k, v in {"groups": groups, "group_regex": group_regex,
                                 "test_input": test_input}.items() if v is not None}
    if classes is not None:
        options["classes"] = to_list(classes)
    config = PrepareConfig(
        source=source, input=None if input is None else str(input), out=str(out), folds_dir=str(folds_dir),
        folds=int(folds), seed=int(seed), encoding=str(encoding), jpeg_quality=int(jpeg_quality),
        size=None if size is None else int(size), shard_mb=float(shard_mb),
        workers=None if workers is None else int(workers), drop_blank=bool(drop_blank),
        near_dup=near_dup if isinstance(near_dup, bool) else int(near_dup), dedupe=bool(dedupe),
        verify=bool(verify), overwrite=bool(overwrite), holdout=float(holdout),
        source_options={**options, **source_options})
    return prepare(config)


if __name__ == "__main__":
    import sys

    # main takes **source_options, so fire would swallow --help as an option: route it to fire's help
    help_flags = {"--help", "-h"} & set(sys.argv[1:])
    run_cli(main, command=["--", "--help"] if help_flags else None)
