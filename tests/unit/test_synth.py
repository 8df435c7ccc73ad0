"""The synthetic Fruits-360-like generator: layout, format, determinism, class overlap."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from orchard.uploader.synth import TEMPLATES, class_specs, synthesize


def tree(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under root."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_matches_fruits_360(tmp_path: Path) -> None:
    summary = synthesize(tmp_path, classes=3, per_class=4, test_per_class=2, seed=1)
    assert summary.files == 3 * (4 + 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Test", "Training"]
    assert sorted(p.name for p in (tmp_path / "Training").iterdir()) == sorted(summary.classes)
    assert sorted(p.name for p in (tmp_path / "Training" / "Banana").iterdir()) == [f"{i}_100.jpg" for i in range(4)]
    assert len(list((tmp_path / "Test").rglob("*.jpg"))) == 3 * 2


def test_images_are_100px_rgb_jpeg_on_white_without_metadata(tmp_path: Path) -> None:
    synthesize(tmp_path, classes=4, per_class=3, test_per_class=0, seed=2)
    for path in tmp_path.rglob("*.jpg"):
        with Image.open(path) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (100, 100))
            assert "exif" not in image.info and not image.getexif()
            pixels = np.asarray(image, dtype=np.float32)
        corners = np.concatenate([pixels[:6, :6], pixels[:6, -6:], pixels[-6:, :6], pixels[-6:, -6:]])
        assert corners.mean() > 235, f"{path}: background is not white"
        assert pixels.mean() < 235, f"{path}: no fruit drawn"


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    synthesize(tmp_path / "a", classes=5, per_class=3, test_per_class=2, seed=7, workers=1)
    synthesize(tmp_path / "b", classes=5, per_class=3, test_per_class=2, seed=7, workers=2)
    first, second = tree(tmp_path / "a"), tree(tmp_path / "b")
    assert first.keys() == second.keys() and first == second


def test_other_seed_gives_other_images(tmp_path: Path) -> None:
    synthesize(tmp_path / "a", classes=2, per_class=3, test_per_class=0, seed=1)
    synthesize(tmp_path / "b", classes=2, per_class=3, test_per_class=0, seed=2)
    first, second = tree(tmp_path / "a"), tree(tmp_path / "b")
    assert first.keys() == second.keys()
    assert all(first[name] != second[name] for name in first)


def test_images_are_independent_of_the_counts(tmp_path: Path) -> None:
    """Image i of a class is the same whatever the per-class counts (one RNG per image)."""
    synthesize(tmp_path / "small", classes=2, per_class=2, test_per_class=1, seed=3)
    synthesize(tmp_path / "big", classes=3, per_class=5, test_per_class=2, seed=3)
    small, big = tree(tmp_path / "small"), tree(tmp_path / "big")
    assert all(big[name] == data for name, data in small.items())


def test_rerun_rewrites_nothing(tmp_path: Path) -> None:
    synthesize(tmp_path, classes=2, per_class=2, test_per_class=1, seed=4)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.jpg")}
    synthesize(tmp_path, classes=2, per_class=2, test_per_class=1, seed=4)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.jpg")} == before


def test_class_names_are_unique_beyond_the_templates() -> None:
    names = [spec.name for spec in class_specs(len(TEMPLATES) * 2 + 3, seed=0)]
    assert len(set(names)) == len(names)
    assert names[len(TEMPLATES)] == f"{TEMPLATES[0].name} 2"


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        synthesize(tmp_path, classes=0)
    with pytest.raises(ValueError):
        synthesize(tmp_path, classes=1, size=8)


def load_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """16x16 thumbnails as flat vectors and class indices."""
    features, labels = [], []
    for index, folder in enumerate(sorted((root / split).iterdir())):
        for path in sorted(folder.iterdir()):
            with Image.open(path) as image:
                features.append(np.asarray(image.resize((16, 16)), np.float32).ravel() / 255)
            labels.append(index)
    return np.array(features), np.array(labels)


def test_classes_are_learnable_but_overlap(tmp_path: Path) -> None:
    """A nearest-centroid classifier beats chance by far but is not perfect: classes overlap."""
    synthesize(tmp_path, classes=10, per_class=20, test_per_class=8, seed=5)
    x_train, y_train = load_split(tmp_path, "Training")
    x_test, y_test = load_split(tmp_path, "Test")
    centroids = np.stack([x_train[y_train == c].mean(axis=0) for c in range(10)])
    predicted = ((x_test[:, None, :] - centroids[None]) ** 2).sum(axis=-1).argmin(axis=1)
    accuracy = float((predicted == y_test).mean())
    assert 0.4 < accuracy < 0.99, accuracy


def test_cli_synth_writes_the_tree(tmp_path: Path) -> None:
    from orchard.app.cli import main

    out = tmp_path / "cli"
    assert (
        main(
            [
                "-q",
                "dataset",
                "synth",
                str(out),
                "--classes",
                "2",
                "--per-class",
                "3",
                "--test-per-class",
                "1",
                "--seed",
                "11",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    synthesize(tmp_path / "api", classes=2, per_class=3, test_per_class=1, seed=11)
    assert tree(out) == tree(tmp_path / "api")
