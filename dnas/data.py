"""Datasets for architecture search and training: loading, splitting, batching, augmentation.

Everything is returned as numpy arrays in NHWC ``float32`` layout, standardised per channel
with the training split's mean and standard deviation (see :class:`Dataset`).

:func:`load_dataset` understands three kinds of source:

* ``None`` / ``"digits"`` -- the embedded default: scikit-learn's bundled handwritten digits
  (1,797 real 8x8 grayscale images, 10 classes; no network needed).
* an existing directory -- an image folder ``PATH/train/<class>/*.{jpg,jpeg,png}`` with an
  optional ``PATH/test/<class>/...``.
* any other name -- a dataset already prepared in a local tensorflow-datasets data dir
  (tensorflow-datasets is a dependency; TensorFlow is not needed; never downloads anything).

:func:`darts_split` halves a training split for DARTS-style bilevel search,
:func:`epoch_batches` yields deterministic minibatches and :func:`augment_batch` is the
jittable random-crop + horizontal-flip augmentation used in DARTS's CIFAR search.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "DatasetError",
    "Dataset",
    "load_dataset",
    "darts_split",
    "epoch_batches",
    "num_batches",
    "augment_batch",
    "IMAGE_EXTENSIONS",
]

#: File extensions (lower case) read from image folders; matching is case-insensitive.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")

_DIGITS_TRAIN = 1497  # 1,797 images in all: 1,497 train / 300 test
_DECODE_CHUNK = 256  # images per thread-pool task


class DatasetError(ValueError):
    """A dataset could not be found, read or used; the message says what and where."""


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """An image-classification dataset held in memory.

    ``train_x``/``test_x`` are ``(N, H, W, C)`` ``float32`` arrays standardised per channel
    as ``(raw - mean) / std``, where ``raw`` is on the [0, 1] scale and ``mean``/``std`` are
    computed on the training split (a constant channel gets ``std`` 1). Labels are ``int32``
    in ``[0, num_classes)``, indexing ``class_names``. ``test_x``/``test_y`` are ``None``
    when the source has no test split.
    """

    name: str
    train_x: np.ndarray = dataclasses.field(repr=False)
    train_y: np.ndarray = dataclasses.field(repr=False)
    test_x: np.ndarray | None = dataclasses.field(repr=False)
    test_y: np.ndarray | None = dataclasses.field(repr=False)
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of one image."""
        h, w, c = self.train_x.shape[1:]
        return int(h), int(w), int(c)

    @property
    def num_train(self) -> int:
        """Number of training examples."""
        return int(self.train_x.shape[0])

    @property
    def num_test(self) -> int:
        """Number of test examples (0 without a test split)."""
        return 0 if self.test_x is None else int(self.test_x.shape[0])


# --------------------------------------------------------------------------------------
# load_dataset
# --------------------------------------------------------------------------------------


def extract_image_subset(archive: str | os.PathLike, dest: str | os.PathLike, per_class: dict[str, int]) -> Path:
    """Extract the first ``per_class[split]`` images of every class from a tar archive of an
    image-folder tree (``[top/]<split>/<class>/<file>``, e.g. CIFAR-10 as JPEGs) into
    ``dest/<split>/<class>/``, reading the archive once and stopping as soon as every known
    class has enough. Returns ``dest``, ready for :func:`load_dataset`."""
    import tarfile

    dest = Path(dest)
    got: dict[tuple[str, str], int] = {}
    classes: set[str] = set()
    with tarfile.open(archive, "r:*") as tar:
        for m in tar:
            if not m.isfile() or not m.name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            parts = Path(m.name).parts
            at = [i for i, p in enumerate(parts) if p in per_class]
            if not at or len(parts) - at[0] != 3:
                continue
            split, cls, fname = parts[at[0]:]
            classes.add(cls)
            if got.get((split, cls), 0) >= per_class[split]:
                if all(got.get((sp, c), 0) >= n for sp, n in per_class.items() for c in classes):
                    break
                continue
            got[(split, cls)] = got.get((split, cls), 0) + 1
            out = dest / split / cls / fname
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(tar.extractfile(m).read())
    return dest


def load_dataset(
    name_or_path: str | os.PathLike | None = None,
    *,
    limit_examples: int | None = None,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
) -> Dataset:
    """Load a dataset as standardised NHWC ``float32`` arrays.

    Args:
      name_or_path: ``None`` or ``"digits"`` for scikit-learn's bundled digits (1,497 train /
        300 test, a fixed split); an existing directory holding ``train/<class>/*.jpg|png``
        (and optionally ``test/<class>/...``); otherwise the name of a tensorflow-datasets
        dataset already prepared under ``data_dir`` (e.g. ``"cifar10"``, ``"mnist:3.0.1"``).
      limit_examples: keep at most this many training examples (and at most this many test
        examples), chosen class-stratified (round-robin over the classes, each class in a
        seeded random order) before any image is decoded.
      seed: seeds the ``limit_examples`` selection (the digits train/test split is fixed).
      data_dir: tensorflow-datasets data dir; default ``$TFDS_DATA_DIR``, else
        ``~/tensorflow_datasets``. Ignored for digits and image folders.

    Raises:
      DatasetError: with a message naming the path or name and what is wrong.
    """
    ds = _load_any(name_or_path, _check_limit(limit_examples), seed, data_dir)
    present = np.unique(ds.train_y)
    if len(present) < 2:
        raise DatasetError(f"dataset {ds.name!r} has {len(present)} class(es) in its training split "
                           f"({ds.class_names[int(present[0])] if len(present) else 'none'!r}); classification "
                           "needs at least two (a one-class search has zero loss and decides nothing)")
    return ds


def _load_any(name_or_path, limit, seed, data_dir) -> Dataset:
    if name_or_path is None or name_or_path == "digits":
        return _load_digits(limit, seed)
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise DatasetError(
            f"dataset must be a name or a directory path, got {type(name_or_path).__name__}"
        )
    text = os.fspath(name_or_path)
    if not text:
        raise DatasetError("dataset name is empty (use 'digits', a directory or a tfds name)")
    path = Path(text).expanduser()
    looks_like_path = (
        "/" in text or os.sep in text or text.startswith((".", "~")) or isinstance(
            name_or_path, os.PathLike)
    )
    if path.is_dir():
        return _load_image_folder(path, limit, seed)
    if looks_like_path:
        if path.exists():
            raise DatasetError(
                f"{text!r} is not a directory: expected a dataset directory holding "
                "train/<class>/*.jpg|png (and optionally test/<class>/...)"
            )
        raise DatasetError(
            f"no such dataset directory: {text!r} does not exist (expected a directory "
            "holding train/<class>/*.jpg|png, or 'digits', or a tensorflow-datasets name)"
        )
    return _load_tfds(text, data_dir, limit, seed)


def _check_limit(limit: Any) -> int | None:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
        raise DatasetError(f"limit_examples must be a positive integer or None, got {limit!r}")
    return int(limit)


def _stratified_select(labels: np.ndarray, limit: int | None, seed: int,
                       num_classes: int) -> np.ndarray:
    """Indices of at most ``limit`` examples, round-robin over classes in seeded order.

    Without a limit (or a limit >= len(labels)) all indices are returned in order.
    """
    n = len(labels)
    if limit is None or limit >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    # position of each example inside its class's shuffled order; round r takes the r-th
    # example of every class (classes in label order), so sorting by (r, class) interleaves.
    order = []
    for c, idx in enumerate(per_class):
        order.append(np.stack([np.arange(len(idx)), np.full(len(idx), c), idx], axis=1))
    table = np.concatenate(order) if order else np.zeros((0, 3), np.int64)
    table = table[np.lexsort((table[:, 1], table[:, 0]))]
    return table[:limit, 2].astype(np.int64)


def _channel_stats(raw: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean/std of ``raw * scale``, in chunks (exact histogram for uint8)."""
    c = raw.shape[-1]
    flat = raw.reshape(-1, c)
    count = max(flat.shape[0], 1)
    step = 1 << 20
    if raw.dtype == np.uint8:
        # one bincount over value * C + channel: a (256, C) histogram
        code = np.uint16 if c < 256 else np.int64
        offsets = np.arange(c, dtype=code)
        hist = np.zeros(256 * c, np.int64)
        for i in range(0, flat.shape[0], step):
            chunk = flat[i:i + step].astype(code)
            chunk *= c
            chunk += offsets
            hist += np.bincount(chunk.ravel(), minlength=256 * c)
        hist = hist.reshape(256, c).astype(np.float64)
        values = np.arange(256, dtype=np.float64)[:, None]
        mean = (hist * values).sum(axis=0) / count
        var = (hist * (values - mean) ** 2).sum(axis=0) / count
    else:
        s1 = np.zeros(c, np.float64)
        for i in range(0, flat.shape[0], step):
            s1 += flat[i:i + step].sum(axis=0, dtype=np.float64)
        mean = s1 / count
        s2 = np.zeros(c, np.float64)
        for i in range(0, flat.shape[0], step):
            d = flat[i:i + step].astype(np.float64) - mean
            s2 += np.einsum("ij,ij->j", d, d)
        var = s2 / count
    mean, var = mean * scale, var * scale**2
    std = np.where(var > 0, np.sqrt(var), 1.0)
    return mean, std


def _standardise(raw: np.ndarray, scale: float, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    a = (scale / std).astype(np.float32)
    b = (mean / std).astype(np.float32)
    out = np.empty(raw.shape, np.float32)
    step = 256  # small chunks stay in cache
    for i in range(0, raw.shape[0], step):
        chunk = out[i:i + step]
        chunk[...] = raw[i:i + step]
        chunk *= a
        chunk -= b
    return out


def _make_dataset(name: str, train_raw: np.ndarray, train_y: np.ndarray,
                  test_raw: np.ndarray | None, test_y: np.ndarray | None, scale: float,
                  class_names: Sequence[str]) -> Dataset:
    mean, std = _channel_stats(train_raw, scale)
    train_x = _standardise(train_raw, scale, mean, std)
    test_x = None if test_raw is None else _standardise(test_raw, scale, mean, std)
    return Dataset(
        name=name,
        train_x=train_x,
        train_y=np.asarray(train_y, np.int32),
        test_x=test_x,
        test_y=None if test_y is None else np.asarray(test_y, np.int32),
        num_classes=len(class_names),
        class_names=tuple(str(c) for c in class_names),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
    )


# ---- digits ---------------------------------------------------------------------------


def _load_digits(limit: int | None, seed: int) -> Dataset:
    from sklearn.datasets import load_digits  # lazy: only the default dataset needs sklearn

    bunch = load_digits()
    images = np.asarray(bunch.images, np.float64)[..., None]  # (1797, 8, 8, 1), 0..16
    labels = np.asarray(bunch.target, np.int64)
    perm = np.random.default_rng(0).permutation(len(labels))
    tr, te = perm[:_DIGITS_TRAIN], perm[_DIGITS_TRAIN:]
    tr = tr[_stratified_select(labels[tr], limit, seed, 10)]
    te = te[_stratified_select(labels[te], limit, seed, 10)]
    return _make_dataset("digits", images[tr], labels[tr], images[te], labels[te], 1.0 / 16.0,
                         [str(c) for c in range(10)])


# ---- image folders --------------------------------------------------------------------

_LAYOUT = ("expected PATH/train/<class>/*.jpg|jpeg|png (one subdirectory per class) and "
           "optionally PATH/test/<class>/...")


def _list_images(class_dir: Path) -> list[str]:
    with os.scandir(class_dir) as it:
        names = [e.name for e in it
                 if e.name.lower().endswith(IMAGE_EXTENSIONS) and not e.name.startswith(".")
                 and e.is_file()]
    base = os.fspath(class_dir)
    return [os.path.join(base, n) for n in sorted(names)]


def _class_dirs(split_dir: Path) -> list[str]:
    with os.scandir(split_dir) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def _scan_split(root: Path, split: str, classes: list[str] | None
                ) -> tuple[list[str], list[str], np.ndarray]:
    """Class names, image files and labels of ``root/split``."""
    split_dir = root / split
    names = _class_dirs(split_dir)
    if not names:
        raise DatasetError(f"dataset path without images: {split_dir} has no class "
                           f"subdirectories ({_LAYOUT})")
    if classes is None:
        classes = names
    else:
        unknown = [n for n in names if n not in classes]
        if unknown:
            raise DatasetError(
                f"{split_dir} has class director{'ies' if len(unknown) > 1 else 'y'} "
                f"{', '.join(map(repr, unknown))} not present in {root / 'train'} "
                f"(train classes: {', '.join(classes)})")
    per_class = {n: _list_images(split_dir / n) for n in names}
    if not any(per_class.values()):
        raise DatasetError(
            f"dataset path without images: no .jpg/.jpeg/.png files in the class "
            f"directories of {split_dir} ({_LAYOUT})")
    empty = [n for n in names if not per_class[n]]
    if empty:
        raise DatasetError(
            f"class director{'ies' if len(empty) > 1 else 'y'} without images in {split_dir}: "
            f"{', '.join(map(repr, empty))} (no .jpg/.jpeg/.png files)")
    index = {n: i for i, n in enumerate(classes)}
    files: list[str] = []
    labels: list[int] = []
    for n in names:
        files.extend(per_class[n])
        labels.extend([index[n]] * len(per_class[n]))
    return classes, files, np.asarray(labels, np.int64)


def _load_image_folder(root: Path, limit: int | None, seed: int) -> Dataset:
    if not (root / "train").is_dir():
        raise DatasetError(f"{root} has no train/ subdirectory: {_LAYOUT}")
    classes, files, labels = _scan_split(root, "train", None)
    sel = _stratified_select(labels, limit, seed, len(classes))
    files, labels = [files[i] for i in sel], labels[sel]
    train_raw = _decode_images(files, files, "RGB", None)
    test_raw = test_labels = None
    if (root / "test").is_dir():
        _, tfiles, test_labels = _scan_split(root, "test", classes)
        tsel = _stratified_select(test_labels, limit, seed, len(classes))
        tfiles, test_labels = [tfiles[i] for i in tsel], test_labels[tsel]
        test_raw = _decode_images(tfiles, tfiles, "RGB",
                                  (train_raw.shape[2], train_raw.shape[1]), files[0])
    name = root.resolve().name or str(root)
    return _make_dataset(name, train_raw, labels, test_raw, test_labels, 1.0 / 255.0, classes)


# ---- decoding -------------------------------------------------------------------------


def _open_image(src: Any):
    import io

    from PIL import Image

    if isinstance(src, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(bytes(src)))
    return Image.open(src)


def _decode_images(sources: Sequence[Any], names: Sequence[str], mode: str,
                   size: tuple[int, int] | None, size_from: str | None = None) -> np.ndarray:
    """Decode images (paths or encoded bytes) into one ``uint8`` ``(N, H, W, C)`` array.

    All images must have the same ``size`` (width, height); ``None`` takes the first's.
    Decoding runs on a thread pool (PIL releases the GIL while decoding).
    """
    from PIL import UnidentifiedImageError

    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]

    def decode_one(i: int) -> np.ndarray:
        try:
            with _open_image(sources[i]) as im:
                if size is not None and im.size != size:
                    raise DatasetError(
                        f"image {names[i]} is {im.size[0]}x{im.size[1]} (width x height) but "
                        f"{size_from or names[0]} is {size[0]}x{size[1]}: all images of a "
                        "dataset must have the same size")
                arr = np.asarray(im.convert(mode) if im.mode != mode else im, np.uint8)
        except DatasetError:
            raise
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise DatasetError(f"cannot decode image {names[i]}: {e}") from e
        return arr.reshape(arr.shape[0], arr.shape[1], channels)

    n = len(sources)
    if n == 0:
        raise DatasetError("no images to decode")
    if size is None:
        try:
            with _open_image(sources[0]) as im:
                size = im.size
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise DatasetError(f"cannot decode image {names[0]}: {e}") from e
        size_from = names[0]
    out = np.empty((n, size[1], size[0], channels), np.uint8)

    def work(start: int) -> None:
        for i in range(start, min(start + _DECODE_CHUNK, n)):
            out[i] = decode_one(i)

    starts = range(0, n, _DECODE_CHUNK)
    if n <= _DECODE_CHUNK:
        work(0)
        return out
    workers = min(8, (os.cpu_count() or 1) + 2, len(starts))
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="dnas-decode") as ex:
        futures = [ex.submit(work, s) for s in starts]
        try:
            for f in futures:  # in order: the first failing chunk's error is reported
                f.result()
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    return out


# ---- tensorflow-datasets --------------------------------------------------------------

# 'name' or 'name:1.2.3' (a version). Community/namespaced names ('ns:name', 'huggingface:x')
# would go to the network, so they are refused.
_TFDS_NAME = re.compile(r"^[A-Za-z0-9_]+(:\d+\.\d+\.(\d+|\*))?$")


def _tfds_data_dir(data_dir: str | os.PathLike | None) -> Path:
    if data_dir is not None:
        d = os.fspath(data_dir)
    else:
        d = os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    if "://" in d:
        raise DatasetError(f"tfds data_dir {d!r} is remote; only a local directory is read "
                           "(dnas never downloads datasets)")
    return Path(d).expanduser()


def _how_to_prepare(name: str, data_dir: Path) -> str:
    base = name.split(":")[0]
    return (
        f"To get it: on a machine with network access run `tfds build {base} --data_dir DIR` "
        f"(or, in Python, tfds.builder('{base}', data_dir=DIR).download_and_prepare()), then "
        f"copy DIR's contents to "
        f"{data_dir} (or pass data_dir= / set TFDS_DATA_DIR). Alternatively use an image "
        "folder (PATH/train/<class>/*.jpg) or 'digits'.")


def _prepared_versions(data_dir: Path, base: str) -> str:
    """' (DIR holds prepared versions/configs: ...)' or ''."""
    root = data_dir / base
    if not root.is_dir():
        return ""
    found = sorted(p.parent.relative_to(root).as_posix()
                   for p in root.rglob("dataset_info.json"))
    if not found:
        return ""
    return (f" ({root} holds prepared versions/configs: {', '.join(found)}; ask for one as "
            f"'{base}:VERSION')")


def _load_tfds(name: str, data_dir_arg: Any, limit: int | None, seed: int) -> Dataset:
    treated = (f"{name!r} is neither 'digits' nor an existing directory, so it was treated as "
               "a tensorflow-datasets name")
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DatasetError(
            f"{treated}, but tensorflow-datasets is not installed ({e}). Install it with "
            "pip install tensorflow-datasets, or pass an image folder (PATH/train/<class>/*.jpg) "
            "or 'digits'.") from e
    except Exception as e:  # a broken installation (e.g. incompatible protobuf)
        raise DatasetError(f"{treated}, but importing tensorflow_datasets failed: "
                           f"{type(e).__name__}: {e}") from e

    if not all(hasattr(tfds, a) for a in ("builder", "core", "decode", "features")):
        raise DatasetError(f"{treated}, but the installed tensorflow_datasets is broken (it "
                           "imported without its API; see the messages printed above)")
    if not _TFDS_NAME.match(name):
        raise DatasetError(
            f"{treated}, but {name!r} is not a valid local tfds name (expected e.g. 'cifar10' "
            "or 'cifar10:3.0.2'; namespaced/community datasets would need the network)")
    data_dir = _tfds_data_dir(data_dir_arg)
    base = name.split(":")[0]
    if not data_dir.is_dir():
        raise DatasetError(
            f"tfds dataset {name!r} is not prepared locally: the tfds data dir {data_dir} does "
            f"not exist. {_how_to_prepare(name, data_dir)}")
    try:
        builder = tfds.builder(name, data_dir=os.fspath(data_dir), try_gcs=False)
    except Exception as e:
        not_found = getattr(getattr(tfds.core, "registered", None), "DatasetNotFoundError", ())
        if not_found and isinstance(e, not_found):
            raise DatasetError(
                f"{treated}, but tensorflow-datasets {tfds.__version__} has no dataset "
                f"{name!r} and none is prepared under {data_dir / base}"
                f"{_prepared_versions(data_dir, base)}. Check the name, or pass an existing "
                "image folder.") from e
        raise DatasetError(f"cannot open tfds dataset {name!r} in {data_dir}: "
                           f"{type(e).__name__}: {e}") from e
    if not builder.is_prepared():
        raise DatasetError(
            f"tfds dataset {name!r} is not prepared locally: looked in {builder.data_path}"
            f"{_prepared_versions(data_dir, base)}. dnas never downloads datasets. "
            f"{_how_to_prepare(name, data_dir)}")

    info = builder.info
    image_key, label_key = _tfds_keys(name, info, tfds)
    image_feature = info.features[image_key]
    label_feature = info.features[label_key]
    shape = tuple(image_feature.shape)
    channels = shape[-1] if shape and shape[-1] is not None else 3
    if channels not in (1, 3, 4):
        raise DatasetError(f"tfds dataset {name!r}: images with {channels} channels are not "
                           "supported (1, 3 or 4 expected)")
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[channels]
    class_names = list(label_feature.names)
    splits = list(info.splits.keys())
    if "train" not in splits:
        raise DatasetError(f"tfds dataset {name!r} has no 'train' split (splits: {splits})")

    def read(split: str) -> tuple[list[bytes], np.ndarray]:
        records = _tfds_records(name, builder, split, image_key, tfds)
        images = [r[image_key] for r in records]
        labels = np.asarray([int(r[label_key]) for r in records], np.int64)
        return images, labels

    images, labels = read("train")
    sel = _stratified_select(labels, limit, seed, len(class_names))
    images, labels = [images[i] for i in sel], labels[sel]
    tnames = [f"{name}[train][{i}]" for i in sel]
    train_raw = _decode_images(images, tnames, mode, None)
    test_raw = test_labels = None
    if "test" in splits:
        timages, test_labels = read("test")
        tsel = _stratified_select(test_labels, limit, seed, len(class_names))
        timages, test_labels = [timages[i] for i in tsel], test_labels[tsel]
        test_raw = _decode_images(timages, [f"{name}[test][{i}]" for i in tsel], mode,
                                  (train_raw.shape[2], train_raw.shape[1]), tnames[0])
    return _make_dataset(name, train_raw, labels, test_raw, test_labels, 1.0 / 255.0,
                         class_names)


def _tfds_keys(name: str, info: Any, tfds: Any) -> tuple[str, str]:
    keys = info.supervised_keys
    if (isinstance(keys, (tuple, list)) and len(keys) == 2
            and all(isinstance(k, str) for k in keys)):
        image_key, label_key = keys
    elif "image" in info.features and "label" in info.features:
        image_key, label_key = "image", "label"
    else:
        raise DatasetError(f"tfds dataset {name!r} is not an (image, label) classification "
                           f"dataset (supervised keys: {keys!r})")
    if not isinstance(info.features[image_key], tfds.features.Image):
        raise DatasetError(f"tfds dataset {name!r}: feature {image_key!r} is not an image")
    if np.dtype(getattr(info.features[image_key], "np_dtype", np.uint8)) != np.uint8:
        raise DatasetError(f"tfds dataset {name!r}: only uint8 images are supported")
    if not isinstance(info.features[label_key], tfds.features.ClassLabel):
        raise DatasetError(f"tfds dataset {name!r}: feature {label_key!r} is not a class label")
    return image_key, label_key


def _tfds_records(name: str, builder: Any, split: str, image_key: str, tfds: Any
                  ) -> list[dict]:
    """All examples of a split with the image left encoded (PNG/JPEG bytes); no TensorFlow.

    Random-access formats (array_record, parquet) are read through ``as_data_source``;
    tfrecord files (the ``tfds build`` default) are read by a small TFRecord framing reader
    and deserialised by tfds's numpy example parser.
    """
    info = builder.info
    decoders = {image_key: tfds.decode.SkipDecoding()}
    fmt_cls = tfds.core.file_adapters.FileFormat
    available = set(info.available_file_formats()) or {info.file_format}
    random_access = available & set(fmt_cls.with_random_access())
    try:
        if random_access:
            source = builder.as_data_source(split=split, decoders=decoders)
            n = len(source)
            out: list[dict] = []
            for start in range(0, n, 1024):
                out.extend(source.__getitems__(list(range(start, min(start + 1024, n)))))
            return out
        if fmt_cls.TFRECORD in available:
            features = info.features
            files = info.splits[split].filepaths
            return [features.deserialize_example_np(rec, decoders=decoders)
                    for f in files for rec in _read_tfrecord(Path(os.fspath(f)))]
    except DatasetError:
        raise
    except Exception as e:
        raise DatasetError(f"cannot read split {split!r} of tfds dataset {name!r} from "
                           f"{builder.data_path}: {type(e).__name__}: {e}") from e
    raise DatasetError(
        f"tfds dataset {name!r} in {builder.data_path} is stored as "
        f"{', '.join(sorted(f.value for f in available if f))}, which dnas cannot read "
        "without TensorFlow; prepare it with `tfds build NAME --file_format array_record` "
        "(or tfrecord/parquet)")


def _read_tfrecord(path: Path) -> Iterator[bytes]:
    """Records of one TFRecord file (uint64 length, crc32, data, crc32; CRCs not checked)."""
    with open(path, "rb") as f:
        buf = f.read()
    pos, end = 0, len(buf)
    while pos < end:
        if pos + 12 > end:
            raise DatasetError(f"truncated TFRecord file {path} (at byte {pos})")
        length = int.from_bytes(buf[pos:pos + 8], "little")
        start = pos + 12
        stop = start + length
        if stop + 4 > end:
            raise DatasetError(f"truncated TFRecord file {path} (record at byte {pos})")
        yield buf[start:stop]
        pos = stop + 4


# --------------------------------------------------------------------------------------
# splits and batches
# --------------------------------------------------------------------------------------


def _check_xy(x: Any, y: Any) -> int:
    n = len(x)
    if len(y) != n:
        raise DatasetError(f"x and y have different lengths ({n} vs {len(y)})")
    return n


def darts_split(x: np.ndarray, y: np.ndarray, seed: int
                ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Halve a training split for DARTS search: ``((x_w, y_w), (x_a, y_a))``.

    A seeded permutation is cut in two: the first half trains the network weights, the second
    half is the validation data of the architecture step. With an odd number of examples the
    first half gets the extra one.
    """
    n = _check_xy(x, y)
    if n < 2:
        raise DatasetError(f"darts_split needs at least 2 examples, got {n}")
    perm = np.random.default_rng(seed).permutation(n)
    half = (n + 1) // 2
    a, b = perm[:half], perm[half:]
    return (x[a], y[a]), (x[b], y[b])


def num_batches(n: int, batch_size: int, drop_last: bool = True) -> int:
    """Number of batches :func:`epoch_batches` yields for ``n`` examples."""
    if batch_size < 1:
        raise DatasetError(f"batch_size must be positive, got {batch_size}")
    return n // batch_size if drop_last else -(-n // batch_size)


def epoch_batches(x: np.ndarray, y: np.ndarray, batch_size: int, *, seed: int, epoch: int,
                  shuffle: bool = True, drop_last: bool = True
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield the minibatches ``(x_b, y_b)`` of one epoch.

    The order is a permutation drawn from ``np.random.default_rng([seed, epoch])`` (identity
    if ``shuffle`` is false), so it depends only on ``(seed, epoch)``. Every example appears
    at most once per epoch; with ``drop_last`` the final partial batch is skipped.

    Raises:
      DatasetError: if ``batch_size`` is not positive, or exceeds the split with ``drop_last``.
    """
    n = _check_xy(x, y)
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise DatasetError(f"batch_size must be a positive integer, got {batch_size!r}")
    batch_size = int(batch_size)
    if drop_last and batch_size > n:
        raise DatasetError(
            f"batch size {batch_size} is larger than the split ({n} examples), so an epoch "
            "would have no full batch: lower the batch size or use more examples")
    if seed < 0 or epoch < 0:
        raise DatasetError(f"seed and epoch must be non-negative, got seed={seed}, epoch={epoch}")
    order = np.random.default_rng([int(seed), int(epoch)]).permutation(n) if shuffle \
        else np.arange(n)
    for i in range(num_batches(n, batch_size, drop_last)):
        idx = order[i * batch_size:(i + 1) * batch_size]
        yield x[idx], y[idx]


# --------------------------------------------------------------------------------------
# augmentation
# --------------------------------------------------------------------------------------


def augment_batch(key: jax.Array, x: jax.Array, *, pad: int = 4, flip: bool = True) -> jax.Array:
    """Random crop with zero padding and random horizontal flip of an NHWC batch.

    Each image is zero-padded by ``pad`` pixels on every side and cropped back to ``H x W``
    at an independent uniformly random offset, then mirrored left-right with probability 1/2
    (DARTS's CIFAR augmentation). Pure and jittable (``pad``/``flip`` are static): use
    ``jax.jit(augment_batch, static_argnames=("pad", "flip"))``. Padding with zeros pads
    with the channel mean when ``x`` is standardised.
    """
    x = jnp.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"augment_batch expects an NHWC batch, got shape {x.shape}")
    if pad < 0:
        raise ValueError(f"pad must be non-negative, got {pad}")
    b, h, w, c = x.shape
    crop_key, flip_key = jax.random.split(key)
    if pad > 0:
        padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        offsets = jax.random.randint(crop_key, (b, 2), 0, 2 * pad + 1)

        def crop(img: jax.Array, off: jax.Array) -> jax.Array:
            return lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))

        x = jax.vmap(crop)(padded, offsets)
    if flip:
        mirror = jax.random.bernoulli(flip_key, 0.5, (b,))
        x = jnp.where(mirror[:, None, None, None], x[:, :, ::-1, :], x)
    return x
