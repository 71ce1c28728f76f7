"""data.py: the eval round trip, the training chain (augment, mixup, class weights), the shard check
before reading, model_inputs / stream_dataset and the argument errors. Shard selection and counts are
the Manifest's (tests/test_manifest.py)."""
import os

import numpy as np
import pandas as pd
import pytest

from histofold import data, imageops, records
from histofold.errors import DataError, IntegrityError, UsageError
from histofold.manifest import Manifest
from helpers_records import fake_images, fake_label, write_fake_tfrecords

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


def test_manifest_load_matches_the_written_one(tfrec):
    tfrec_dir, manifest = tfrec
    m = Manifest.load(tfrec_dir)
    assert m.data == manifest
    assert m.image_size == (SIZE, SIZE) and m.num_classes == 2 and m.encoding == "png"


def test_make_dataset_accepts_a_manifest_or_its_directory(tfrec):
    tfrec_dir, _ = tfrec
    by_dir = _collect(data.make_dataset(tfrec_dir, folds=[1], batch_size=4, with_ids=True))
    by_manifest = _collect(data.make_dataset(Manifest.load(tfrec_dir), folds=[1], batch_size=4, with_ids=True))
    for a, b in zip(by_dir, by_manifest):
        np.testing.assert_array_equal(a, b)


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


def test_balanced_class_weights():
    assert data.balanced_class_weights([30, 10]) == [40 / 60, 40 / 20]
    assert data.balanced_class_weights([5, 0, 5]) == [10 / 15, 0.0, 10 / 15]
    with pytest.raises(UsageError, match="all zero"):
        data.balanced_class_weights([0, 0])


def test_eval_cardinality_is_known_and_right(tfrec):
    tfrec_dir, _ = tfrec
    ds = data.make_dataset(tfrec_dir, batch_size=4)                   # 21 records: 6 batches, last of 1
    assert int(ds.cardinality()) == 6 == len(list(ds))
    dropped = data.make_dataset(tfrec_dir, batch_size=4, drop_remainder=True)
    assert int(dropped.cardinality()) == 5 == len(list(dropped))


def test_missing_dir_says_to_run_prepare(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(DataError, match="nope.*prepare_tfrecords.py"):
        data.make_dataset(missing)


def test_absent_folds_list_the_available_ones(tfrec):
    tfrec_dir, _ = tfrec
    with pytest.raises(DataError, match=r"\[3, 7\].*available folds: \[0, 1, 2\]"):
        data.make_dataset(tfrec_dir, folds=[0, 3, 7])


def test_no_test_set_cannot_be_read(tmp_path):
    tfrec_dir, _ = _write(tmp_path, "raw", n_test=0, folds=2, n_per_fold=3)
    with pytest.raises(UsageError, match="no test shards"):
        data.make_dataset(tfrec_dir, split="test")


def test_shards_are_checked_against_the_manifest_before_reading(tmp_path):
    tfrec_dir, manifest = _write(tmp_path, "raw", folds=2, n_per_fold=4, n_test=2)
    victim = next(s["file"] for s in manifest["shards"] if s["fold"] == 1)
    path = os.path.join(tfrec_dir, victim)
    blob = bytearray(open(path, "rb").read())
    blob[len(blob) // 2] ^= 0xFF                                      # same size, different bytes
    open(path, "wb").write(bytes(blob))
    data.make_dataset(tfrec_dir, folds=[0])                           # fold 0 is intact
    data.make_dataset(tfrec_dir, folds=[1])                           # sizes match: only hashes see it
    with pytest.raises(IntegrityError, match=victim):
        data.make_dataset(tfrec_dir, folds=[1], check_hashes=True)
    os.remove(path)
    with pytest.raises(IntegrityError, match=f"{victim} is missing"):
        data.make_dataset(tfrec_dir, folds=[1])
    with pytest.raises(IntegrityError, match=victim):
        data.make_dataset(tfrec_dir, training=True)


def test_bad_arguments_are_named(tfrec):
    tfrec_dir, _ = tfrec
    with pytest.raises(ValueError, match="label_mode"):
        data.make_dataset(tfrec_dir, label_mode="sparse")
    with pytest.raises(ValueError, match="class_weight has 3"):
        data.make_dataset(tfrec_dir, class_weight=[1, 2, 3])
    with pytest.raises(UsageError, match="--augment='heavy'"):
        data.make_dataset(tfrec_dir, training=True, augment="heavy")
    with pytest.raises(ValueError, match="num_classes=3"):
        data.make_dataset(tfrec_dir, num_classes=3, label_mode="categorical")
    with pytest.raises(ValueError, match="with_ids=True is for evaluation"):
        data.make_dataset(tfrec_dir, training=True, with_ids=True)
    with pytest.raises(ValueError, match="mixup"):
        data.make_dataset(tfrec_dir, mixup=0.4)                       # not training
    with pytest.raises(ValueError, match="mixup"):
        data.make_dataset(tfrec_dir, training=True, mixup=0.4, label_mode="int")


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


def test_training_with_mixup_blends_labels_and_weights(tfrec):
    tfrec_dir, _ = tfrec
    weights = [0.5, 2.0]
    ds = data.make_dataset(tfrec_dir, training=True, batch_size=8, mixup=0.4, class_weight=weights, seed=1)
    ys, ws = [], []
    for x, y, w in ds.take(6):
        assert x.shape == (8, SIZE, SIZE, 3) and y.shape == (8, 1)
        ys.append(y.numpy()[:, 0])
        ws.append(w.numpy())
    y, w = np.concatenate(ys), np.concatenate(ws)
    assert ((0.0 <= y) & (y <= 1.0)).all()
    assert ((0.0 < y) & (y < 1.0)).any()                              # some labels are blends
    np.testing.assert_allclose(w, weights[0] + (weights[1] - weights[0]) * y, rtol=1e-5)  # same lam


def test_model_inputs_is_the_one_resize():
    images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    out = data.model_inputs(images, 8).numpy()
    assert out.shape == (2, 8, 8, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out, imageops.resize(images, 8).numpy())
    np.testing.assert_array_equal(data.model_inputs(images, (16, 16)).numpy(), images.astype(np.float32))


def test_stream_dataset_batches_generator_items_through_model_inputs():
    rng = np.random.default_rng(1)
    items = [(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), j % 2, f"{j:03d}") for j in range(5)]
    ds = data.stream_dataset(lambda: iter(items), image_shape=(16, 16), image_size=8, batch_size=2)
    x, y, ids = _collect(ds)
    assert x.shape == (5, 8, 8, 3) and x.dtype == np.float32
    np.testing.assert_array_equal(x, imageops.resize(np.stack([i[0] for i in items]), 8).numpy())
    assert y.tolist() == [0, 1, 0, 1, 0]
    assert [i.decode() for i in ids] == ["000", "001", "002", "003", "004"]
