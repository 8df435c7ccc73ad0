"""Discovery: layouts, keys, labels, and a reason for everything that is not uploaded."""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from orchard.core.lake import normalise_split
from orchard.uploader.discovery import (
    check_dataset,
    dataset_slug,
    discover,
    label_slug,
    read_labels,
)
from orchard.uploader.report import Outcome


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def problems(found) -> dict[str, tuple[str, str]]:
    """File name -> (outcome, code) of every problem."""
    return {Path(p.path).name: (p.outcome.value, p.code) for p in found.problems}


def test_fruits_360_layout_normalises_splits_and_slugs_labels(tmp_path: Path) -> None:
    touch(tmp_path / "Training" / "Apple Red 2" / "0_100.jpg")
    touch(tmp_path / "Training" / "Banana" / "r_1_100.jpg")
    touch(tmp_path / "Test" / "Banana" / "5_100.jpg")
    found = discover(tmp_path, "fruits")
    assert [i.key for i in found.items] == [
        "fruits/test/banana/5_100.jpg",
        "fruits/train/apple_red_2/0_100.jpg",
        "fruits/train/banana/r_1_100.jpg",
    ]
    apple = found.items[1]
    assert (apple.split, apple.label, apple.label_text) == ("train", "apple_red_2", "Apple Red 2")
    assert apple.path == tmp_path / "Training" / "Apple Red 2" / "0_100.jpg"
    assert found.problems == [] and found.ignored == 0


def test_without_split_folders_every_file_gets_the_default_split(tmp_path: Path) -> None:
    touch(tmp_path / "cats" / "a.png")
    touch(tmp_path / "dogs" / "b.jpeg")
    found = discover(tmp_path, "pets", default_split="val")
    assert [i.key for i in found.items] == ["pets/val/cats/a.png", "pets/val/dogs/b.jpeg"]


def test_hidden_and_non_image_files_are_ignored_and_counted(tmp_path: Path) -> None:
    touch(tmp_path / "Training" / "Kiwi" / "1.jpg")
    touch(tmp_path / "Training" / "Kiwi" / ".DS_Store")
    touch(tmp_path / "Training" / "Kiwi" / "._1.jpg")
    touch(tmp_path / "Training" / "Kiwi" / "notes.txt")
    touch(tmp_path / "README.md")
    found = discover(tmp_path, "d")
    assert [i.key for i in found.items] == ["d/train/kiwi/1.jpg"]
    assert found.ignored == 4 and found.problems == []


def test_symlinks_are_skipped_with_a_reason_and_not_followed(tmp_path: Path) -> None:
    real = touch(tmp_path / "Training" / "Kiwi" / "1.jpg")
    (tmp_path / "Training" / "Kiwi" / "link.jpg").symlink_to(real)
    (tmp_path / "Training" / "Linked").symlink_to(tmp_path / "Training" / "Kiwi", target_is_directory=True)
    found = discover(tmp_path, "d")
    assert [i.key for i in found.items] == ["d/train/kiwi/1.jpg"]
    assert problems(found) == {"link.jpg": ("skipped", "symlink"), "Linked": ("skipped", "symlink")}
    assert all("symlink" in p.reason and str(real.parent) in p.reason for p in found.problems)


def test_files_outside_the_layout_fail_with_the_expected_layout(tmp_path: Path) -> None:
    touch(tmp_path / "Training" / "Kiwi" / "1.jpg")
    touch(tmp_path / "Training" / "Kiwi" / "deeper" / "2.jpg")
    touch(tmp_path / "Training" / "loose.jpg")
    touch(tmp_path / "papers" / "fig.png")
    found = discover(tmp_path, "d")
    assert [i.key for i in found.items] == ["d/train/kiwi/1.jpg"]
    assert problems(found) == {
        "2.jpg": ("failed", "nested"),
        "loose.jpg": ("failed", "no_label"),
        "fig.png": ("failed", "not_split"),
    }
    assert all("<label>/<file>" in p.reason for p in found.problems)


def test_names_keep_spaces_and_unicode_in_nfc(tmp_path: Path) -> None:
    decomposed = unicodedata.normalize("NFD", "pêche ünï.jpg")
    touch(tmp_path / "Pêches" / decomposed)
    touch(tmp_path / "Pêches" / "with space.jpg")
    found = discover(tmp_path, "d")
    assert [i.key for i in found.items] == ["d/train/pêches/pêche ünï.jpg", "d/train/pêches/with space.jpg"]
    assert found.items[0].key == unicodedata.normalize("NFC", found.items[0].key)


def test_undecodable_and_control_character_names_fail(tmp_path: Path) -> None:
    folder = tmp_path / "Kiwi"
    folder.mkdir()
    (folder / "ok.jpg").write_bytes(b"x")
    with open(os.path.join(os.fsencode(folder), b"bad\xff.jpg"), "wb") as fh:
        fh.write(b"x")
    (folder / "tab\there.jpg").write_bytes(b"x")
    found = discover(tmp_path, "d")
    assert [i.key for i in found.items] == ["d/train/kiwi/ok.jpg"]
    reasons = sorted(p.reason for p in found.problems)
    assert reasons == ["name contains control characters", "name is not valid UTF-8"]
    assert {p.code for p in found.problems} == {"bad_name"}


def test_fifo_with_an_image_suffix_fails(tmp_path: Path) -> None:
    (tmp_path / "Kiwi").mkdir()
    os.mkfifo(tmp_path / "Kiwi" / "pipe.jpg")
    found = discover(tmp_path, "d")
    assert found.items == [] and problems(found) == {"pipe.jpg": ("failed", "not_regular")}


def test_two_files_on_one_key_keep_the_first(tmp_path: Path) -> None:
    touch(tmp_path / "Apple Red" / "1.jpg")
    touch(tmp_path / "apple_red" / "1.jpg")
    found = discover(tmp_path, "d")
    assert [i.source for i in found.items] == [str(tmp_path / "Apple Red" / "1.jpg")]
    assert [(p.code, p.path) for p in found.problems] == [("key_collision", str(tmp_path / "apple_red" / "1.jpg"))]


def test_npy_stack_rows_become_items_with_their_labels(tmp_path: Path) -> None:
    np.save(tmp_path / "images.npy", np.zeros((3, 8, 8, 4), np.uint8))
    np.save(tmp_path / "labels.npy", np.array([2, 0, 2]))
    labels = read_labels(tmp_path / "labels.npy")
    found = discover(tmp_path, "sat", "test", labels=labels, exclude=[tmp_path / "labels.npy"])
    assert [(i.key, i.row) for i in found.items] == [
        ("sat/test/0/images_000001.npy", 1),
        ("sat/test/2/images_000000.npy", 0),
        ("sat/test/2/images_000002.npy", 2),
    ]
    assert found.items[0].source == f"{tmp_path / 'images.npy'}[1]"
    assert found.problems == [] and found.ignored == 1  # the labels file itself


def test_a_single_stack_file_can_be_the_source(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((2, 4, 4), np.float32))
    found = discover(tmp_path / "x.npy", "sat", labels=["sea", "forest"])
    assert [i.key for i in found.items] == ["sat/train/forest/x_000001.npy", "sat/train/sea/x_000000.npy"]


def test_stack_with_the_wrong_number_of_labels_fails(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((2, 4, 4), np.uint8))
    found = discover(tmp_path, "sat", labels=["a", "b", "c"])
    assert found.items == [] and problems(found) == {"x.npy": ("failed", "label_count")}


def test_single_image_npy_in_class_folders(tmp_path: Path) -> None:
    np.save(touch(tmp_path / "Forest" / "tile.npy"), np.zeros((4, 4, 13), np.uint16))
    found = discover(tmp_path, "sat")
    assert [i.key for i in found.items] == ["sat/train/forest/tile.npy"] and found.items[0].row is None


def test_read_labels_from_text(tmp_path: Path) -> None:
    (tmp_path / "labels.txt").write_text("Sea Lake\n\nForest\n", encoding="utf-8")
    assert read_labels(tmp_path / "labels.txt") == ["Sea Lake", "Forest"]


@pytest.mark.parametrize(
    ("folder", "split"),
    [("Training", "train"), ("Test", "test"), ("validation", "val"), ("VAL", "val"), ("papers", None)],
)
def test_split_names(folder: str, split: str | None) -> None:
    assert normalise_split(folder) == split


def test_slugs_and_dataset_names() -> None:
    assert label_slug("Apple Red 2") == "apple_red_2"
    assert label_slug("Pêche / Blanche") == "pêche_blanche"
    assert label_slug("***") == ""
    assert dataset_slug("Fruits 360") == "fruits-360"
    assert check_dataset("bench-orchard-1") == "bench-orchard-1"
    for bad in ("", "Upper", "-lead", "a/b", "x" * 64):
        with pytest.raises(ValueError):
            check_dataset(bad)


def test_every_problem_has_a_one_line_reason_naming_the_file(tmp_path: Path) -> None:
    touch(tmp_path / "Training" / "Kiwi" / "deeper" / "2.jpg")
    (tmp_path / "Training" / "Kiwi" / "l.jpg").symlink_to(tmp_path / "nowhere.jpg")
    found = discover(tmp_path, "d")
    assert len(found.problems) == 2
    for problem in found.problems:
        line = problem.line()
        assert "\n" not in line and line.startswith(problem.path) and problem.outcome in Outcome


def test_cli_rejects_bad_upload_arguments_before_touching_services(tmp_path: Path) -> None:
    from orchard.app.cli import main
    from orchard.core.errors import ExitStatus

    touch(tmp_path / "Kiwi" / "1.jpg")
    assert main(["-q", "upload", str(tmp_path), "--dataset", "Not Valid"]) == ExitStatus.USAGE
    assert main(["-q", "upload", str(tmp_path), "--split", "holdout"]) == ExitStatus.USAGE
    assert main(["-q", "upload", str(tmp_path / "Kiwi" / "1.jpg")]) == ExitStatus.USAGE
