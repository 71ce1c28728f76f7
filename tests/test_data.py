"""data.py: shard selection, counts, the eval round trip, the training chain and its errors."""
import os

import numpy as np
import pandas as pd
import pytest

from histofold import data, records
from tests.helpers_records import fake_images, fake_label, write_fake_tfrecords

N_PER_FOLD, FOLDS, N_TEST, SIZE = 7, 3, 5, 16   # 7 per fold: batch 4 leaves a remainder of 3


def _write(tmp_path, encoding="png", **kw):
    out = tmp_path / f"tfrecords_{encoding}"
    args = dict(n_per_fold=N_PER_FOLD, folds=FOLDS, n_test=N_TEST, size=SIZE, seed=0)
    args.update(kw)
    manifest = write_fake_tfrecords(out, encoding=encoding, **args)
    return str(out), manifest


@pytest.fixture(scope="module")
def tfrec(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("data"))


def _collect(ds):
    """Concatenate every batch of a finite dataset: tuple of numpy arrays."""
    parts = list(zip(*[tuple(t.numpy() for t in batch) for batch in ds]))
    return tuple(np.concatenate(p) for p in parts)


def test_helper_writes_the_designed_layout(tfrec):
    tfrec_dir, manifest = tfrec
    names = sorted(os.listdir(tfrec_dir))
    assert {"manifest.json", "test_ids.csv", "sample_submission.csv"} <= set(names)
    shards = [n for n in names if records.parse_shard_name(n)]
    assert sorted(s["file"] for s in manifest["shards"]) == shards
    assert manifest["counts"]["per_fold"] == {str(k): N_PER_FOLD for k in range(FOLDS)}
    assert os.path.exists(manifest["folds_csv"])
    assert pd.read_csv(os.path.join(tfrec_dir, "test_ids.csv")).columns.tolist() == ["id", "label"]


def test_load_manifest_matches_the_written_one(tfrec):
    tfrec_dir, manifest = tfrec
    assert data.load_manifest(tfrec_dir) == manifest


def test_count_records_equals_manifest_counts(tfrec):
    tfrec_dir, manifest = tfrec
    assert data.count_records(tfrec_dir) == manifest["counts"]["train"]
    assert data.count_records(tfrec_dir, split="test") == manifest["counts"]["test"]
    for k in range(FOLDS):
        assert data.count_records(tfrec_dir, folds=[k]) == manifest["counts"]["per_fold"][str(k)]


def test_shard_files_selects_by_name_in_order(tfrec):
    tfrec_dir, _ = tfrec
    files = data.shard_files(tfrec_dir, folds=[2, 0])
    parsed = [records.parse_shard_name(f) for f in files]
    assert [(p["fold"], p["index"]) for p in parsed] == [(0, 0), (0, 1), (2, 0), (2, 1)]
    assert all(f.startswith(tfrec_dir) for f in files)
    assert [records.parse_shard_name(f)["prefix"] for f in data.shard_files(tfrec_dir, split="test")] == ["test"] * 2


@pytest.mark.parametrize("encoding", ["raw", "png"])
def test_eval_round_trip_is_pixel_identical(tmp_path, encoding):
    tfrec_dir, _ = _write(tmp_path, encoding)
    truth = fake_images(n_per_fold=N_PER_FOLD, folds=FOLDS, n_test=N_TEST, size=SIZE, seed=0)
    x, y, ids = _collect(data.make_dataset(tfrec_dir, folds=[0, 1, 2], batch_size=4, with_ids=True,
                                           label_mode="int"))
    assert x.dtype == np.float32 and x.shape == (FOLDS * N_PER_FOLD, SIZE, SIZE, 3)
    for image, i in zip(x, ids):
        np.testing.assert_array_equal(image, truth[i.decode()].astype(np.float32))
    assert y.dtype == np.int32


def test_eval_round_trip_jpeg_is_close(tmp_path):
    tfrec_dir, _ = _write(tmp_path, "jpeg")
    truth = fake_images(n_per_fold=N_PER_FOLD, folds=FOLDS, n_test=N_TEST, size=SIZE, seed=0)
    x, _, ids = _collect(data.make_dataset(tfrec_dir, split="test", batch_size=4, with_ids=True))
    errors = [np.abs(image - truth[i.decode()]).mean() for image, i in zip(x, ids)]
    assert len(errors) == N_TEST and max(errors) < 12     # mean abs error of quality-95 JPEG on noise


def test_eval_order_is_deterministic_complete_and_keeps_the_remainder(tfrec):
    tfrec_dir, _ = tfrec
    ds = data.make_dataset(tfrec_dir, folds=[1], batch_size=4, with_ids=True)
    sizes = [int(b[0].shape[0]) for b in ds]
    assert sizes == [4, 3]                                # the remainder batch is kept
    first, second = _collect(ds)[2], _collect(ds)[2]
    assert list(first) == list(second) and len(set(first)) == N_PER_FOLD


def test_test_split_follows_test_ids_csv_order(tfrec):
    tfrec_dir, _ = tfrec
    _, y, ids = _collect(data.make_dataset(tfrec_dir, split="test", batch_size=2, with_ids=True))
    expected = pd.read_csv(os.path.join(tfrec_dir, "test_ids.csv"))
    assert [i.decode() for i in ids] == expected["id"].tolist()
    assert y.shape == (N_TEST, 1) and np.all(y == -1)


def test_selected_folds_return_exactly_their_ids(tfrec):
    tfrec_dir, manifest = tfrec
    folds = pd.read_csv(manifest["folds_csv"])
    _, _, ids = _collect(data.make_dataset(tfrec_dir, folds=[0, 2], batch_size=5, with_ids=True))
    assert sorted(i.decode() for i in ids) == sorted(folds.loc[folds.fold.isin([0, 2]), "id"])


@pytest.mark.parametrize("label_mode,shape,dtype", [("binary", (1,), np.float32),
                                                    ("categorical", (2,), np.float32),
                                                    ("int", (), np.int32)])
def test_label_modes(tfrec, label_mode, shape, dtype):
    tfrec_dir, manifest = tfrec
    folds = pd.read_csv(manifest["folds_csv"]).set_index("id")
    _, y, ids = _collect(data.make_dataset(tfrec_dir, folds=[0], batch_size=8, label_mode=label_mode,
                                           with_ids=True))
    assert y.shape[1:] == shape and y.dtype == dtype
    labels = folds.loc[[i.decode() for i in ids], "label"].to_numpy()
    decoded = {"binary": y.reshape(-1), "categorical": y.argmax(-1), "int": y}[label_mode]
    np.testing.assert_array_equal(decoded, labels)


def test_training_yields_repeated_shuffled_weighted_batches(tfrec):
    tfrec_dir, manifest = tfrec
    counts = [sum(manifest["counts"]["per_fold_class"][str(k)][str(c)] for k in range(FOLDS)) for c in range(2)]
    weights = data.balanced_class_weights(counts)
    ds = data.make_dataset(tfrec_dir, training=True, batch_size=8, augment="light", class_weight=weights,
                           image_size=12, seed=3, shuffle_buffer=64)
    n = FOLDS * N_PER_FOLD
    batches = [tuple(t.numpy() for t in b) for b in ds.take(3 * n // 8 + 1)]   # more than 3 epochs
    for x, y, w in batches:
        assert x.shape == (8, 12, 12, 3) and x.dtype == np.float32
        assert y.shape == (8, 1) and w.shape == (8,)
        assert 0.0 <= x.min() and x.max() <= 255.0
        np.testing.assert_allclose(w, np.asarray(weights, np.float32)[y[:, 0].astype(int)])
    labels = np.concatenate([y[:, 0] for _, y, _ in batches])
    assert set(np.unique(labels)) == {0.0, 1.0}
    # shuffled: the label stream is not the written order
    written = [fake_label(j, 2) for _ in range(FOLDS) for j in range(N_PER_FOLD)]
    assert labels[:n].tolist() != written


def test_training_augmentation_differs_between_epochs(tfrec):
    tfrec_dir, _ = tfrec
    # one record, batch 1: every element is the same image, augmented with a new seed each time
    ds = data.make_dataset(tfrec_dir, folds=[0], training=True, batch_size=1, augment="strong",
                           shuffle_buffer=1, seed=1)
    xs = [b[0].numpy() for b in ds.take(2 * N_PER_FOLD)]
    assert len({x.tobytes() for x in xs}) == len(xs)


def test_resize_and_categorical_for_multiclass(tmp_path):
    tfrec_dir, _ = _write(tmp_path, "raw", num_classes=3, folds=2, n_per_fold=8)
    x, y = _collect(data.make_dataset(tfrec_dir, batch_size=16, image_size=(20, 24), label_mode="categorical",
                                      num_classes=3))
    assert x.shape == (16, 20, 24, 3) and y.shape == (16, 3)
    assert np.all(y.sum(-1) == 1)
    with pytest.raises(ValueError, match="binary"):
        data.make_dataset(tfrec_dir, num_classes=3)


def test_balanced_class_weights_and_steps():
    assert data.balanced_class_weights([30, 10]) == [40 / 60, 40 / 20]
    assert data.balanced_class_weights([5, 0, 5]) == [10 / 15, 0.0, 10 / 15]
    assert data.steps_per_epoch(130, 64) == 2 and data.steps_per_epoch(10, 64) == 1


def test_missing_dir_says_to_run_prepare(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="prepare_tfrecords.py.*nope"):
        data.load_manifest(missing)
    with pytest.raises(FileNotFoundError, match="prepare_tfrecords.py"):
        data.make_dataset(missing)
    with pytest.raises(FileNotFoundError, match="prepare_tfrecords.py"):
        data.shard_files(missing)


def test_absent_folds_list_the_available_ones(tfrec):
    tfrec_dir, _ = tfrec
    with pytest.raises(ValueError, match=r"\[3, 7\].*available folds: \[0, 1, 2\]"):
        data.count_records(tfrec_dir, folds=[0, 3, 7])
    with pytest.raises(ValueError, match="split"):
        data.shard_files(tfrec_dir, split="valid")


def test_no_test_set_counts_zero_and_cannot_be_read(tmp_path):
    tfrec_dir, _ = _write(tmp_path, "raw", n_test=0, folds=2, n_per_fold=3)
    assert data.shard_files(tfrec_dir, split="test") == [] and data.count_records(tfrec_dir, split="test") == 0
    with pytest.raises(ValueError, match="no test-"):
        data.make_dataset(tfrec_dir, split="test")


def test_bad_arguments_are_named(tfrec):
    tfrec_dir, _ = tfrec
    with pytest.raises(ValueError, match="label_mode"):
        data.make_dataset(tfrec_dir, label_mode="sparse")
    with pytest.raises(ValueError, match="class_weight has 3"):
        data.make_dataset(tfrec_dir, class_weight=[1, 2, 3])
    with pytest.raises(ValueError, match="unknown augment preset"):
        data.make_dataset(tfrec_dir, training=True, augment="heavy")


def test_augment_callable_gets_batches_and_batch_seed_pairs(tfrec):
    tfrec_dir, _ = tfrec
    import tensorflow as tf
    seen = []

    def augment(images, seed_pair):
        seen.append(tuple(images.shape))
        # tag each batch with its seed pair: (seed, batch index) -> pixel values 5 + index
        return tf.zeros_like(tf.cast(images, tf.float32)) + tf.cast(seed_pair[0] + seed_pair[1], tf.float32)

    ds = data.make_dataset(tfrec_dir, training=True, batch_size=4, augment=augment, seed=5)
    xs = [b[0].numpy() for b in ds.take(3)]
    assert seen and seen[0][1:] == (SIZE, SIZE, 3)
    assert [float(x[0, 0, 0, 0]) for x in xs] == [5.0, 6.0, 7.0]


@pytest.mark.parametrize("encoding", ["raw", "jpeg"])
def test_training_batches_for_each_encoding(tmp_path, encoding):
    tfrec_dir, _ = _write(tmp_path, encoding)
    ds = data.make_dataset(tfrec_dir, training=True, batch_size=5, augment="strong", seed=2)
    for x, y in ds.take(4):
        assert x.shape == (5, SIZE, SIZE, 3) and y.shape == (5, 1)
        assert 0.0 <= x.numpy().min() and x.numpy().max() <= 255.0
