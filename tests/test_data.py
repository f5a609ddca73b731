"""Tests of dnas.data: datasets, splits, batches and augmentation."""
from __future__ import annotations

import dataclasses
import json
import socket
import sys
import tarfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dnas import data as D
from dnas.data import (
    Dataset,
    DatasetError,
    augment_batch,
    darts_split,
    epoch_batches,
    load_dataset,
    num_batches,
)

CIFAR_TAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                 "ship", "truck")


def raw_of(ds: Dataset, x: np.ndarray) -> np.ndarray:
    """Undo the standardisation: back to the [0, 1] scale."""
    return x.astype(np.float64) * np.asarray(ds.std) + np.asarray(ds.mean)


def assert_standardised(x: np.ndarray, atol_mean=1e-4, atol_std=1e-3) -> None:
    flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
    np.testing.assert_allclose(flat.mean(axis=0), 0.0, atol=atol_mean)
    np.testing.assert_allclose(flat.std(axis=0), 1.0, atol=atol_std)


# --------------------------------------------------------------------------------------
# digits (the embedded default)
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset()


def test_digits_shapes_and_dtypes(digits):
    assert digits.name == "digits"
    assert digits.train_x.shape == (1497, 8, 8, 1)
    assert digits.test_x.shape == (300, 8, 8, 1)
    assert digits.train_x.dtype == np.float32 and digits.test_x.dtype == np.float32
    assert digits.train_y.shape == (1497,) and digits.train_y.dtype == np.int32
    assert digits.test_y.shape == (300,) and digits.test_y.dtype == np.int32
    assert digits.num_classes == 10
    assert digits.class_names == tuple(str(i) for i in range(10))
    assert digits.image_shape == (8, 8, 1)
    assert set(np.unique(digits.train_y)) == set(range(10))
    assert len(digits.mean) == 1 and len(digits.std) == 1


def test_digits_standardised_with_train_stats(digits):
    assert_standardised(digits.train_x)
    # mean/std are on the raw [0, 1] scale; raw pixels were 0..16 / 16
    assert 0.0 < digits.mean[0] < 1.0 and 0.0 < digits.std[0] < 1.0
    for x in (digits.train_x, digits.test_x):
        raw = raw_of(digits, x) * 16
        np.testing.assert_allclose(raw, np.round(raw), atol=1e-3)
        assert raw.min() > -1e-3 and raw.max() < 16 + 1e-3


def test_digits_are_the_sklearn_images_split_without_overlap(digits):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    ref = sorted((int(t), im.astype(np.uint8).tobytes())
                 for im, t in zip(bunch.images, bunch.target))
    ours = []
    for x, y in ((digits.train_x, digits.train_y), (digits.test_x, digits.test_y)):
        raw = np.round(raw_of(digits, x)[..., 0] * 16).astype(np.uint8)
        ours.extend((int(t), im.tobytes()) for im, t in zip(raw, y))
    assert sorted(ours) == ref  # train + test are exactly the 1,797 digits, each once


def test_digits_deterministic_and_independent_of_seed(digits):
    again = load_dataset("digits", seed=123)
    np.testing.assert_array_equal(again.train_x, digits.train_x)
    np.testing.assert_array_equal(again.train_y, digits.train_y)
    np.testing.assert_array_equal(again.test_y, digits.test_y)
    assert again.mean == digits.mean and again.std == digits.std


def test_digits_limit_examples_is_stratified_and_seeded():
    a = load_dataset(limit_examples=50, seed=1)
    assert a.train_x.shape == (50, 8, 8, 1) and a.test_x.shape == (50, 8, 8, 1)
    np.testing.assert_array_equal(np.bincount(a.train_y, minlength=10), [5] * 10)
    np.testing.assert_array_equal(np.bincount(a.test_y, minlength=10), [5] * 10)
    assert_standardised(a.train_x)  # stats of the limited train split
    b = load_dataset(limit_examples=50, seed=1)
    np.testing.assert_array_equal(a.train_x, b.train_x)
    c = load_dataset(limit_examples=50, seed=2)
    assert not np.array_equal(raw_of(a, a.train_x), raw_of(c, c.train_x))
    odd = load_dataset(limit_examples=13, seed=0)
    counts = np.bincount(odd.train_y, minlength=10)
    assert counts.sum() == 13 and counts.max() - counts.min() <= 1
    big = load_dataset(limit_examples=10_000)
    assert big.train_x.shape[0] == 1497 and big.test_x.shape[0] == 300


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10"])
def test_limit_examples_must_be_positive_int(bad):
    with pytest.raises(DatasetError, match="limit_examples"):
        load_dataset(limit_examples=bad)


def test_dataset_is_frozen(digits):
    with pytest.raises(dataclasses.FrozenInstanceError):
        digits.name = "other"  # type: ignore[misc]
    assert "train_x" not in repr(digits)  # arrays are kept out of the repr


# --------------------------------------------------------------------------------------
# darts_split
# --------------------------------------------------------------------------------------


def test_darts_split_halves():
    x = np.arange(11)[:, None] * np.ones((1, 3))
    y = np.arange(11) * 10
    (xa, ya), (xb, yb) = darts_split(x, y, seed=0)
    assert len(xa) == len(ya) == 6 and len(xb) == len(yb) == 5  # odd: extra goes first
    np.testing.assert_array_equal(ya, xa[:, 0] * 10)  # x and y stay aligned
    np.testing.assert_array_equal(yb, xb[:, 0] * 10)
    assert set(ya).isdisjoint(yb)
    assert sorted(set(ya) | set(yb)) == list(y)


def test_darts_split_deterministic_per_seed():
    x, y = np.arange(100), np.arange(100)
    (a1, _), (b1, _) = darts_split(x, y, seed=3)
    (a2, _), (b2, _) = darts_split(x, y, seed=3)
    (a3, _), _ = darts_split(x, y, seed=4)
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(b1, b2)
    assert len(a1) == len(b1) == 50
    assert not np.array_equal(np.sort(a1), np.sort(a3))
    assert not np.array_equal(np.sort(a1), np.arange(50))  # actually shuffled


def test_darts_split_errors():
    with pytest.raises(DatasetError, match="lengths"):
        darts_split(np.zeros(4), np.zeros(5), seed=0)
    with pytest.raises(DatasetError, match="at least 2"):
        darts_split(np.zeros(1), np.zeros(1), seed=0)


# --------------------------------------------------------------------------------------
# epoch_batches / num_batches
# --------------------------------------------------------------------------------------


def _batches(n, bs, **kw):
    x = np.arange(n)
    y = np.arange(n) + 1000
    out = list(epoch_batches(x, y, bs, **kw))
    for xb, yb in out:
        np.testing.assert_array_equal(yb, xb + 1000)
    return [xb for xb, _ in out]


def test_epoch_batches_cover_each_example_at_most_once():
    bs = _batches(103, 10, seed=0, epoch=0)
    assert len(bs) == num_batches(103, 10) == 10
    assert all(len(b) == 10 for b in bs)
    seen = np.concatenate(bs)
    assert len(np.unique(seen)) == 100 and seen.max() < 103
    full = _batches(103, 10, seed=0, epoch=0, drop_last=False)
    assert len(full) == num_batches(103, 10, drop_last=False) == 11
    assert len(full[-1]) == 3
    np.testing.assert_array_equal(np.sort(np.concatenate(full)), np.arange(103))


def test_epoch_batches_deterministic_per_seed_and_epoch():
    a = np.concatenate(_batches(64, 8, seed=1, epoch=2))
    b = np.concatenate(_batches(64, 8, seed=1, epoch=2))
    c = np.concatenate(_batches(64, 8, seed=1, epoch=3))
    d = np.concatenate(_batches(64, 8, seed=2, epoch=2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, d)
    ordered = np.concatenate(_batches(64, 8, seed=1, epoch=2, shuffle=False))
    np.testing.assert_array_equal(ordered, np.arange(64))


def test_epoch_batches_batch_larger_than_split():
    with pytest.raises(DatasetError, match="larger than the split"):
        list(epoch_batches(np.zeros(5), np.zeros(5), 8, seed=0, epoch=0))
    bs = _batches(5, 8, seed=0, epoch=0, drop_last=False)
    assert len(bs) == 1 and sorted(bs[0]) == list(range(5))
    with pytest.raises(DatasetError, match="batch_size"):
        list(epoch_batches(np.zeros(5), np.zeros(5), 0, seed=0, epoch=0))
    with pytest.raises(DatasetError, match="lengths"):
        list(epoch_batches(np.zeros(5), np.zeros(4), 2, seed=0, epoch=0))


def test_num_batches():
    assert num_batches(10, 3) == 3
    assert num_batches(10, 3, drop_last=False) == 4
    assert num_batches(9, 3, drop_last=False) == 3
    assert num_batches(2, 3) == 0


# --------------------------------------------------------------------------------------
# augment_batch
# --------------------------------------------------------------------------------------


def _images(n, h=10, w=12, c=3, seed=0):
    # strictly positive, asymmetric values so that flips and shifts are detectable
    return np.random.default_rng(seed).uniform(0.5, 1.5, (n, h, w, c)).astype(np.float32)


def test_augment_shape_and_identity():
    x = _images(8)
    key = jax.random.key(0)
    out = augment_batch(key, x)
    assert out.shape == x.shape and out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(augment_batch(key, x, pad=0, flip=False)), x)
    assert not np.array_equal(np.asarray(out), x)


def test_augment_jittable_and_pure():
    x = _images(16)
    key = jax.random.key(1)
    jitted = jax.jit(augment_batch, static_argnames=("pad", "flip"))
    a = np.asarray(jitted(key, x, pad=2, flip=True))
    b = np.asarray(augment_batch(key, x, pad=2, flip=True))
    np.testing.assert_allclose(a, b)
    np.testing.assert_array_equal(a, np.asarray(jitted(key, x, pad=2, flip=True)))
    c = np.asarray(jitted(jax.random.key(2), x, pad=2, flip=True))
    assert not np.array_equal(a, c)


def test_augment_flip_only():
    x = _images(512)
    out = np.asarray(augment_batch(jax.random.key(3), x, pad=0, flip=True))
    same = np.all(out == x, axis=(1, 2, 3))
    flipped = np.all(out == x[:, :, ::-1, :], axis=(1, 2, 3))
    assert np.all(same ^ flipped)  # each image is either untouched or mirrored left-right
    assert 0.4 < flipped.mean() < 0.6
    # vertical flips never happen
    assert not np.any(np.all(out == x[:, ::-1, :, :], axis=(1, 2, 3)))


def _find_offset(img, padded, h, w):
    for dy in range(padded.shape[0] - h + 1):
        for dx in range(padded.shape[1] - w + 1):
            if np.array_equal(img, padded[dy:dy + h, dx:dx + w]):
                return dy, dx
    return None


@pytest.mark.parametrize("flip", [False, True])
def test_augment_crop_is_translated_copy(flip):
    pad, n, h, w = 3, 48, 10, 12
    x = _images(n, h, w)
    out = np.asarray(augment_batch(jax.random.key(4), x, pad=pad, flip=flip))
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = []
    for i in range(n):
        off = _find_offset(out[i], padded[i], h, w)
        if off is None and flip:
            off = _find_offset(out[i][:, ::-1], padded[i], h, w)
        assert off is not None, f"image {i} is not a shifted copy of its padded original"
        offsets.append(off)
        # all original (nonzero) pixels inside the window survive; zeros only at the border
        zero_rows = np.flatnonzero(np.all(out[i] == 0, axis=(1, 2)))
        zero_cols = np.flatnonzero(np.all(out[i] == 0, axis=(0, 2)))
        assert len(zero_rows) <= pad and len(zero_cols) <= pad
        assert np.count_nonzero(out[i]) == (h - len(zero_rows)) * (w - len(zero_cols)) * 3
    offsets = np.asarray(offsets)
    assert offsets.min() >= 0 and offsets.max() <= 2 * pad
    assert len({tuple(o) for o in offsets}) > 10  # per-image random offsets


def test_augment_rejects_non_batches():
    with pytest.raises(ValueError, match="NHWC"):
        augment_batch(jax.random.key(0), jnp.zeros((8, 8, 3)))


# --------------------------------------------------------------------------------------
# image folders
# --------------------------------------------------------------------------------------

COLOURS = {"bird": (10, 20, 30), "cat": (200, 100, 50), "dog": (0, 255, 128)}


def _save(path: Path, size=(5, 6), colour=(1, 2, 3), mode="RGB", fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    value = colour if mode == "RGB" else colour[0]
    Image.new(mode, size, value).save(path, format=fmt)


def _make_folder(root: Path, counts: dict[str, dict[str, int]], size=(5, 6)) -> Path:
    """counts: {split: {class: n}}; PNG images of a per-class colour, i in the last pixel."""
    for split, classes in counts.items():
        for cls, n in classes.items():
            for i in range(n):
                p = root / split / cls / f"{i:03d}.png"
                p.parent.mkdir(parents=True, exist_ok=True)
                img = Image.new("RGB", size, COLOURS.get(cls, (7, 7, 7)))
                img.putpixel((size[0] - 1, size[1] - 1), (i, i, i))
                img.save(p)
    return root


def test_image_folder_labels_classes_and_standardisation(tmp_path):
    root = _make_folder(tmp_path / "pets", {"train": {"dog": 3, "cat": 4, "bird": 2},
                                             "test": {"cat": 2, "dog": 1}})
    # other spellings of the extensions, a grayscale image, and files that are not images
    _save(root / "train" / "bird" / "extra.PNG", colour=COLOURS["bird"])
    _save(root / "train" / "bird" / "photo.JpG", colour=(10, 20, 30), fmt="JPEG")
    _save(root / "train" / "cat" / "gray.jpeg", colour=(90, 0, 0), mode="L", fmt="JPEG")
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    (root / "train" / ".hidden").mkdir()
    ds = load_dataset(str(root))
    assert ds.name == "pets"
    assert ds.class_names == ("bird", "cat", "dog") and ds.num_classes == 3
    assert ds.train_x.shape == (12, 6, 5, 3) and ds.train_x.dtype == np.float32
    assert ds.image_shape == (6, 5, 3)
    np.testing.assert_array_equal(np.bincount(ds.train_y), [4, 5, 3])
    assert ds.test_x.shape == (3, 6, 5, 3)
    np.testing.assert_array_equal(np.sort(ds.test_y), [1, 1, 2])
    assert_standardised(ds.train_x)
    # the PNG pixels come back exactly, with the label of their folder
    raw = np.round(raw_of(ds, ds.train_x) * 255).astype(int)
    for label, cls in enumerate(ds.class_names):
        centre = raw[ds.train_y == label][:, 0, 0, :]
        assert np.sum(np.all(centre == COLOURS[cls], axis=1)) >= 2
    gray = raw[np.all(np.abs(raw[:, 0, 0, :] - 90) <= 3, axis=1)]
    assert len(gray) == 1 and np.ptp(gray[0, 0, 0]) == 0  # L converted to RGB
    test_raw = np.round(raw_of(ds, ds.test_x) * 255).astype(int)
    for img, label in zip(test_raw, ds.test_y):
        np.testing.assert_array_equal(img[0, 0], COLOURS[ds.class_names[label]])


def test_image_folder_without_test_split(tmp_path):
    root = _make_folder(tmp_path / "d", {"train": {"a": 2, "b": 2}})
    ds = load_dataset(root)  # a Path works too
    assert ds.test_x is None and ds.test_y is None and ds.num_test == 0
    assert ds.num_train == 4


def test_image_folder_limit_selects_before_decoding(tmp_path, monkeypatch):
    root = _make_folder(tmp_path / "d", {"train": {"a": 10, "b": 10, "c": 10},
                                         "test": {"a": 4, "b": 4, "c": 4}})
    opened = []
    real_open = D._open_image

    def spy(src):
        opened.append(str(src))
        return real_open(src)

    monkeypatch.setattr(D, "_open_image", spy)
    ds = load_dataset(str(root), limit_examples=7, seed=5)
    assert ds.train_x.shape[0] == 7 and ds.test_x.shape[0] == 7
    np.testing.assert_array_equal(np.bincount(ds.train_y), [3, 2, 2])
    np.testing.assert_array_equal(np.bincount(ds.test_y), [3, 2, 2])
    assert len({p for p in opened if "/train/" in p.replace("\\", "/")}) == 7
    assert len({p for p in opened if "/test/" in p.replace("\\", "/")}) == 7

    def ids(d):  # which image of its class each example is (encoded in the last pixel)
        return sorted(zip(d.train_y, np.round(raw_of(d, d.train_x)[:, -1, -1, 0] * 255)))

    same = load_dataset(str(root), limit_examples=7, seed=5)
    other = load_dataset(str(root), limit_examples=7, seed=6)
    assert ids(ds) == ids(same)
    assert ids(ds) != ids(other)


def test_image_folder_missing_path(tmp_path):
    with pytest.raises(DatasetError, match="no such dataset directory"):
        load_dataset(str(tmp_path / "nope"))
    with pytest.raises(DatasetError, match="no such dataset directory"):
        load_dataset("./definitely/not/here")


def test_image_folder_path_is_a_file(tmp_path):
    f = tmp_path / "file.png"
    _save(f)
    with pytest.raises(DatasetError, match="not a directory"):
        load_dataset(str(f))


def test_image_folder_without_train_dir(tmp_path):
    _make_folder(tmp_path / "d", {"training": {"a": 1}})
    with pytest.raises(DatasetError, match=r"no train/ subdirectory.*train/<class>"):
        load_dataset(str(tmp_path / "d"))


def test_image_folder_empty_train(tmp_path):
    (tmp_path / "d" / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match="dataset path without images"):
        load_dataset(str(tmp_path / "d"))
    (tmp_path / "d" / "train" / "a").mkdir()
    (tmp_path / "d" / "train" / "a" / "readme.txt").write_text("x")
    with pytest.raises(DatasetError, match="dataset path without images"):
        load_dataset(str(tmp_path / "d"))


def test_image_folder_class_without_images(tmp_path):
    root = _make_folder(tmp_path / "d", {"train": {"a": 2, "b": 2}})
    (root / "train" / "zebra").mkdir()
    with pytest.raises(DatasetError, match="'zebra'"):
        load_dataset(str(root))


def test_image_folder_mismatched_sizes(tmp_path):
    root = _make_folder(tmp_path / "d", {"train": {"a": 2, "b": 2}}, size=(5, 6))
    _save(root / "train" / "b" / "odd.png", size=(7, 6))
    with pytest.raises(DatasetError, match=r"odd\.png is 7x6.*is 5x6"):
        load_dataset(str(root))
    root2 = _make_folder(tmp_path / "e", {"train": {"a": 2}, "test": {"a": 1}}, size=(5, 6))
    _save(root2 / "test" / "a" / "big.png", size=(5, 9))
    with pytest.raises(DatasetError, match=r"big\.png is 5x9"):
        load_dataset(str(root2))


def test_image_folder_test_class_not_in_train(tmp_path):
    root = _make_folder(tmp_path / "d", {"train": {"a": 2, "b": 2}, "test": {"a": 1, "c": 1}})
    with pytest.raises(DatasetError, match="'c' not present in"):
        load_dataset(str(root))


def test_image_folder_corrupt_image(tmp_path):
    root = _make_folder(tmp_path / "d", {"train": {"a": 2}})
    (root / "train" / "a" / "broken.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(DatasetError, match=r"cannot decode image .*broken\.jpg"):
        load_dataset(str(root))


def test_image_folder_many_images_use_the_thread_pool(tmp_path):
    n = D._DECODE_CHUNK + 40  # more than one chunk
    root = _make_folder(tmp_path / "d", {"train": {"a": n // 2, "b": n - n // 2}},
                        size=(4, 4))
    ds = load_dataset(str(root))
    assert ds.train_x.shape == (n, 4, 4, 3)
    raw = np.round(raw_of(ds, ds.train_x) * 255).astype(int)
    # every image is where its label says (no chunk was written to the wrong slot)
    for label, cls in enumerate(("a", "b")):
        idx = raw[ds.train_y == label][:, -1, -1, 0]
        np.testing.assert_array_equal(np.sort(idx), np.arange(np.sum(ds.train_y == label)))


# --------------------------------------------------------------------------------------
# the real thing: CIFAR-10 as JPEG files (from ../shared/data, skipped when absent)
# --------------------------------------------------------------------------------------


def _extract_cifar_subset(dest: Path, train_per_class: int, test_per_class: int) -> None:
    D.extract_image_subset(CIFAR_TAR, dest, {"train": train_per_class, "test": test_per_class})


@pytest.fixture(scope="module")
def cifar_tar() -> Path:
    if not CIFAR_TAR.is_file():
        pytest.skip(f"{CIFAR_TAR.name} not found beside the repository (shared/data)")
    return CIFAR_TAR


def test_cifar10_jpeg_subset(cifar_tar, tmp_path):
    _extract_cifar_subset(tmp_path / "cifar", 20, 5)
    ds = load_dataset(str(tmp_path / "cifar"))
    assert ds.class_names == CIFAR_CLASSES and ds.num_classes == 10
    assert ds.train_x.shape == (200, 32, 32, 3) and ds.image_shape == (32, 32, 3)
    assert ds.test_x.shape == (50, 32, 32, 3)
    np.testing.assert_array_equal(np.bincount(ds.train_y), [20] * 10)
    np.testing.assert_array_equal(np.bincount(ds.test_y), [5] * 10)
    assert_standardised(ds.train_x)
    # roughly CIFAR-10's channel statistics even on 200 images
    np.testing.assert_allclose(ds.mean, (0.49, 0.48, 0.45), atol=0.06)
    # a decoded image equals PIL's decoding of the same file
    first = sorted((tmp_path / "cifar" / "train" / "airplane").iterdir())[0]
    ref = np.asarray(Image.open(first).convert("RGB"), np.float64) / 255
    i = int(np.flatnonzero(ds.train_y == 0)[0])
    np.testing.assert_allclose(raw_of(ds, ds.train_x[i]), ref, atol=1e-5)
    limited = load_dataset(str(tmp_path / "cifar"), limit_examples=30, seed=0)
    np.testing.assert_array_equal(np.bincount(limited.train_y), [3] * 10)


@pytest.mark.slow
def test_cifar10_jpeg_full(cifar_tar, tmp_path):
    with tarfile.open(cifar_tar, "r:gz") as tar:
        tar.extractall(tmp_path / "cifar", filter="data")
    root = tmp_path / "cifar"
    tops = [p for p in root.iterdir() if p.is_dir()]
    if not (root / "train").is_dir() and len(tops) == 1:
        root = tops[0]
    start = time.perf_counter()
    ds = load_dataset(str(root))
    elapsed = time.perf_counter() - start
    print(f"loaded CIFAR-10 JPEG (50,000 + 10,000 images) in {elapsed:.1f}s")
    assert ds.train_x.shape == (50000, 32, 32, 3) and ds.test_x.shape == (10000, 32, 32, 3)
    np.testing.assert_array_equal(np.bincount(ds.train_y), [5000] * 10)
    np.testing.assert_array_equal(np.bincount(ds.test_y), [1000] * 10)
    np.testing.assert_allclose(ds.mean, (0.4914, 0.4822, 0.4465), atol=0.01)
    np.testing.assert_allclose(ds.std, (0.2470, 0.2435, 0.2616), atol=0.01)


# --------------------------------------------------------------------------------------
# tensorflow-datasets (optional dependency; never any network)
# --------------------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test if anything opens a network connection."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted during a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield attempts
    assert not attempts, f"network access attempted: {attempts}"


def test_tfds_not_installed(monkeypatch, tmp_path, no_network):
    monkeypatch.chdir(tmp_path)  # no directory called cifar10 here
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails
    with pytest.raises(DatasetError) as err:
        load_dataset("cifar10")
    msg = str(err.value)
    assert "pip install tensorflow-datasets" in msg
    assert "'cifar10'" in msg and "treated as a tensorflow-datasets name" in msg
    with pytest.raises(DatasetError, match=r"'digitz'.*pip install tensorflow-datasets"):
        load_dataset("digitz")  # a typo is explained the same way


def test_tfds_reader_frames_tfrecord_files(tmp_path):
    records = [b"", b"abc", bytes(range(256)) * 5]
    f = tmp_path / "x.tfrecord-00000-of-00001"
    with open(f, "wb") as out:
        for r in records:  # uint64 length, crc32c(length), data, crc32c(data); CRCs unchecked
            out.write(len(r).to_bytes(8, "little") + b"\0" * 4 + r + b"\0" * 4)
    assert list(D._read_tfrecord(f)) == records
    f.write_bytes(f.read_bytes()[:-3])
    with pytest.raises(DatasetError, match="truncated TFRecord"):
        list(D._read_tfrecord(f))


@pytest.fixture
def tfds_mod():
    return pytest.importorskip("tensorflow_datasets")


def test_tfds_not_prepared(tfds_mod, tmp_path, monkeypatch, no_network):
    monkeypatch.chdir(tmp_path)
    data_dir = tmp_path / "tfds"
    data_dir.mkdir()
    with pytest.raises(DatasetError) as err:
        load_dataset("cifar10", data_dir=str(data_dir))
    msg = str(err.value)
    assert "not prepared locally" in msg and str(data_dir) in msg
    assert "tfds build cifar10" in msg and "download_and_prepare" in msg
    assert list(data_dir.iterdir()) == []  # nothing was written
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "from_env"))
    with pytest.raises(DatasetError, match=r"from_env.* does not exist"):
        load_dataset("mnist")
    with pytest.raises(DatasetError, match="has no dataset 'no_such_dataset_xyz'"):
        load_dataset("no_such_dataset_xyz", data_dir=str(data_dir))
    with pytest.raises(DatasetError, match="not a valid local tfds name"):
        load_dataset("huggingface:mnist", data_dir=str(data_dir))


def _prepare_tiny_tfds(tfds, data_dir: Path, file_format: str, channels: int = 3) -> str:
    """Prepare a 3-class 8x8 dataset (PIL-encoded PNGs: no TensorFlow needed)."""

    with tfds.core.registered.skip_registration():
        class DnasTestTiny(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")

            def _info(self):
                return tfds.core.DatasetInfo(
                    builder=self,
                    features=tfds.features.FeaturesDict({
                        "image": tfds.features.Image(shape=(8, 8, channels)),
                        "label": tfds.features.ClassLabel(names=["ant", "bee", "cow"]),
                    }),
                    supervised_keys=("image", "label"))

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples(30), "test": self._generate_examples(9)}

            def _generate_examples(self, n):
                for i in range(n):
                    img = np.full((8, 8, channels), 20 * (i % 3) + 5, np.uint8)
                    img[0, 0] = i
                    pil = Image.fromarray(img if channels == 3 else img[..., 0])
                    yield i, {"image": pil, "label": i % 3}

    DnasTestTiny(data_dir=str(data_dir), file_format=file_format).download_and_prepare()
    return "dnas_test_tiny"


def _to_tfrecord(tfds, data_dir: Path, name: str) -> None:
    """Rewrite a prepared array_record dataset as tfrecord files (what `tfds build` writes)."""
    version_dir = data_dir / name / "1.0.0"
    builder = tfds.builder(name, data_dir=str(data_dir))
    for split in ("train", "test"):
        raw = builder.as_data_source(split=split,
                                     deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
        with open(version_dir / f"{name}-{split}.tfrecord-00000-of-00001", "wb") as out:
            for i in range(len(raw)):
                r = raw[i]
                out.write(len(r).to_bytes(8, "little") + b"\0" * 4 + r + b"\0" * 4)
        for f in version_dir.glob(f"{name}-{split}.array_record-*"):
            f.unlink()
    info_path = version_dir / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info["fileFormat"] = "tfrecord"
    info_path.write_text(json.dumps(info))


@pytest.mark.parametrize("file_format", ["array_record", "parquet", "tfrecord"])
def test_tfds_prepared_dataset_is_read_without_tensorflow(tfds_mod, tmp_path, monkeypatch,
                                                          no_network, file_format):
    if file_format == "parquet":
        pytest.importorskip("pyarrow")
    monkeypatch.chdir(tmp_path)
    data_dir = tmp_path / "tfds"
    name = _prepare_tiny_tfds(tfds_mod, data_dir, "array_record" if file_format == "tfrecord"
                              else file_format)
    if file_format == "tfrecord":
        _to_tfrecord(tfds_mod, data_dir, name)
    ds = load_dataset(name, data_dir=str(data_dir))
    assert ds.name == name and ds.class_names == ("ant", "bee", "cow")
    assert ds.train_x.shape == (30, 8, 8, 3) and ds.test_x.shape == (9, 8, 8, 3)
    np.testing.assert_array_equal(np.bincount(ds.train_y), [10, 10, 10])
    assert_standardised(ds.train_x)
    raw = np.round(raw_of(ds, ds.train_x) * 255).astype(int)
    np.testing.assert_array_equal(raw[:, 3, 3, 0], 20 * raw[:, 0, 0, 0] % 60 + 5)
    np.testing.assert_array_equal(raw[:, 0, 0, 0] % 3, ds.train_y)  # labels match images
    assert sorted(raw[:, 0, 0, 0]) == list(range(30))
    limited = load_dataset(name, data_dir=str(data_dir), limit_examples=4, seed=1)
    np.testing.assert_array_equal(np.bincount(limited.train_y), [2, 1, 1])
    assert limited.test_x.shape[0] == 4


def test_tfds_grayscale_keeps_one_channel(tfds_mod, tmp_path, monkeypatch, no_network):
    monkeypatch.chdir(tmp_path)
    name = _prepare_tiny_tfds(tfds_mod, tmp_path / "tfds", "array_record", channels=1)
    ds = load_dataset(name, data_dir=str(tmp_path / "tfds"))
    assert ds.train_x.shape == (30, 8, 8, 1) and len(ds.mean) == 1  # like mnist
    raw = np.round(raw_of(ds, ds.train_x) * 255).astype(int)
    assert sorted(raw[:, 0, 0, 0]) == list(range(30))
