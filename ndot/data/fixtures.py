"""Small datasets written in the exact on-disk formats the real loaders read (for tests and benchmarks).

CIFAR: torchvision's pickles and folder layout; torchvision checks every file's
md5, so `write_cifar` returns the lists to register in place of the real ones.
CIFAR10-DVS: tonic's folder of `.aedat4` recordings (written with faery, a test
dependency) and its `CIFAR10DVS.zip` marker, which ndot does not need but tonic's own
CIFAR10DVS does (the tests and the benchmark that read the fixture through it).
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import calculate_md5

from ndot.data import dvs

_LAYOUT: dict[str, dict[str, Any]] = {
    "cifar10": {"cls": CIFAR10, "labels": "labels", "names": {"label_names": 10}},
    "cifar100": {"cls": CIFAR100, "labels": "fine_labels", "names": {"fine_label_names": 100, "coarse_label_names": 20}},
}


def _dump(path: Path, obj: dict[str, Any]) -> str:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)
    return calculate_md5(path)


def write_cifar(root: Path, name: str, train: tuple[np.ndarray, np.ndarray],
                test: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    """Write (uint8 images [N, 32, 32, 3], labels [N]) splits under root as torchvision lays them out.

    Returns {"train_list", "test_list", "meta"}: the class attributes that hold the md5s torchvision checks.
    """
    layout = _LAYOUT[name]
    cls = layout["cls"]
    folder = root / cls.base_folder
    folder.mkdir(parents=True, exist_ok=True)

    def batch(images: np.ndarray, labels: np.ndarray, label: str) -> dict[str, Any]:
        n = len(labels)
        out = {"batch_label": label, layout["labels"]: [int(v) for v in labels],
               "data": np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(n, 3 * 32 * 32),
               "filenames": [f"image_{i}.png" for i in range(n)]}
        if name == "cifar100":
            out["coarse_labels"] = [int(v) // 5 for v in labels]
        return out

    parts = zip(np.array_split(train[0], len(cls.train_list)), np.array_split(train[1], len(cls.train_list)))
    train_list = [[f, _dump(folder / f, batch(x, y, f))] for (f, _), (x, y) in zip(cls.train_list, parts)]
    test_list = [[f, _dump(folder / f, batch(*test, f))] for f, _ in cls.test_list]
    names = {key: [f"class_{i}" for i in range(n)] for key, n in layout["names"].items()}
    meta_file = cls.meta["filename"]
    meta = dict(cls.meta, md5=_dump(folder / meta_file, names))
    return {"train_list": train_list, "test_list": test_list, "meta": meta}


def recording_events(n: int, rng: np.random.Generator) -> np.ndarray:
    """n events in faery's dtype, uniform over the sensor, timestamps increasing."""
    import faery

    w, h, _ = dvs.SENSOR_SIZE
    events = np.zeros(n, dtype=faery.EVENTS_DTYPE)
    events["t"] = np.cumsum(rng.integers(1, 50, n))
    events["x"] = rng.integers(0, w, n)
    events["y"] = rng.integers(0, h, n)
    events["on"] = rng.random(n) < 0.5
    return events


def write_recording(path: Path, events: np.ndarray, dimensions: tuple[int, int] = dvs.SENSOR_SIZE[:2]) -> None:
    """One .aedat4 recording of a sensor of `dimensions` (W, H), by default CIFAR10-DVS's, as faery writes it."""
    import faery

    faery.events_stream_from_array(events, dimensions=dimensions).to_file(path)


def write_cifar10dvs(root: Path, per_class: int, events: int, seed: int = 0) -> Path:
    """CIFAR10-DVS as tonic finds it under `root`: <root>/CIFAR10DVS/<class>/cifar10_<class>_<i>.aedat4 and the marker.

    Recording i holds `events + i % 7` events (so that not every count divides T);
    files are created in a shuffled order, so a listing's order is not the natural one.
    """
    rng = np.random.default_rng(seed)
    folder = root / dvs.CIFAR10DVS.__name__
    for name in dvs.CLASSES:
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in rng.permutation(per_class):
            write_recording(folder / name / f"cifar10_{name}_{i}.aedat4", recording_events(events + int(i) % 7, rng))
    (folder / dvs.CIFAR10DVS.filename).touch()
    return folder
