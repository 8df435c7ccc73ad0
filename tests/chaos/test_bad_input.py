"""Bad input through `orchard upload` and `orchard infer`, generated here.

Every bad file must end with its stated reason (a code in the JSON report and a one-line message
naming the file on stderr), nothing may crash, and every good file - including the unusual but
valid ones (alpha, grayscale, CMYK, 16-bit, spaces and Unicode in names) - must be uploaded,
indexed and predicted.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import unicodedata
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ChaosStack, Ledger, dataset_docs, infer_args, prediction_problems, read_json_line, upload_args

pytestmark = pytest.mark.chaos

# file name -> (outcome, code) of the bad and special files; good files are "uploaded".
BAD = {
    "truncated.jpg": ("failed", "truncated"),
    "empty.jpg": ("failed", "empty"),
    "text.jpg": ("failed", "not_image"),
    "bomb.png": ("failed", "decompression_bomb"),
    "link.jpg": ("skipped", "symlink"),
    "zz-duplicate.jpg": ("skipped", "duplicate"),
}
# good files with an unusual shape -> the colour mode their document must record
SPECIAL = {
    "alpha.png": "RGBA",
    "gray.jpg": "L",
    "cmyk.jpg": "CMYK",
    "deep.png": "I;16",
    "with space.jpg": "RGB",
    "ünïcødé 日本.jpg": "RGB",
}


def picture(rng: np.random.Generator, size: int = 64) -> Image.Image:
    """A small RGB picture: a coloured disc on a noisy background."""
    yy, xx = np.mgrid[:size, :size]
    r = rng.uniform(size / 5, size / 2.5)
    disc = (xx - size / 2) ** 2 + (yy - size / 2) ** 2 < r * r
    pixels = rng.integers(180, 255, (size, size, 3)).astype(np.uint8)
    pixels[disc] = rng.integers(0, 255, 3)
    return Image.fromarray(pixels)


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(side: int = 100_000) -> bytes:
    """A tiny PNG whose header declares side x side RGB pixels (10 Gpx): a decompression bomb."""
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + png_chunk(b"IEND", b"")
    )


def make_tree(root: Path, seed: int) -> dict[str, Path]:
    """The test tree; returns file name -> path of every entry (good, special and bad)."""
    rng = np.random.default_rng(seed)
    good = root / "Training" / "Good"
    other = root / "Training" / "Äpfel Grün"  # a class folder with a space and Unicode
    for d in (good, other):
        d.mkdir(parents=True)
    files: dict[str, Path] = {}

    def put(folder: Path, name: str, data: bytes) -> None:
        files[name] = folder / name
        files[name].write_bytes(data)

    for i in range(4):
        put(good, f"ok_{i}.jpg", encode(picture(rng), "JPEG"))
        put(other, f"apfel_{i}.jpg", encode(picture(rng), "JPEG"))
    rgba = picture(rng).convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 255, (64, 64)).astype(np.uint8)))
    put(good, "alpha.png", encode(rgba, "PNG"))
    put(good, "gray.jpg", encode(picture(rng).convert("L"), "JPEG"))
    put(good, "cmyk.jpg", encode(picture(rng).convert("CMYK"), "JPEG"))
    put(good, "deep.png", encode(Image.fromarray(rng.integers(0, 65535, (64, 64)).astype(np.uint16)), "PNG"))
    put(good, "with space.jpg", encode(picture(rng), "JPEG"))
    put(other, "ünïcødé 日本.jpg", encode(picture(rng), "JPEG"))
    whole = encode(picture(rng, 128), "JPEG")
    put(good, "truncated.jpg", whole[: len(whole) // 2])
    put(good, "empty.jpg", b"")
    put(good, "text.jpg", b"This is a text file, not a JPEG.\n" * 20)
    put(good, "bomb.png", bomb_png())
    files["link.jpg"] = good / "link.jpg"
    os.symlink(files["ok_0.jpg"], files["link.jpg"])
    files["zz-duplicate.jpg"] = good / "zz-duplicate.jpg"
    shutil.copyfile(files["ok_1.jpg"], files["zz-duplicate.jpg"])
    return files


def test_bad_input_gets_its_reason_and_every_good_file_is_predicted(
    chaos: ChaosStack, model_version: str, ledger: Ledger, tmp_path: Path
):
    dataset = chaos.dataset("bad-input")
    files = make_tree(chaos.data_dir / dataset, chaos.seed(6000))
    good = sorted(set(files) - set(BAD))
    report_path = tmp_path / "report.json"

    run = chaos.cli(*upload_args(chaos.data_dir / dataset, dataset, "--report", str(report_path)))
    assert run.returncode == 1, f"expected exit 1 (some files failed):\n{run.tail()}"
    assert "Traceback" not in run.output, run.tail()
    report = json.loads(report_path.read_text())
    outcomes = {Path(p["path"]).name: (p["outcome"], p["code"]) for p in report["failures"] + report["skipped"]}
    outcomes = {unicodedata.normalize("NFC", k): v for k, v in outcomes.items()}
    assert outcomes == BAD, {
        k: (outcomes.get(k), BAD.get(k)) for k in set(outcomes) | set(BAD) if outcomes.get(k) != BAD.get(k)
    }
    assert report["counts"]["uploaded"] == len(good), report["counts"]
    for problem in report["failures"] + report["skipped"]:
        line = f"{problem['path']}: {problem['reason']}"
        assert line in run.stderr, f"no one-line message naming {problem['path']}:\n{run.tail()}"
        assert "\n" not in problem["reason"]

    es, index = chaos.es(), chaos.settings.images_index
    docs = {
        unicodedata.normalize("NFC", k.rsplit("/", 1)[1]): hit for k, hit in dataset_docs(es, index, dataset).items()
    }
    assert set(docs) == set(good), set(docs) ^ set(good)
    modes = {name: docs[name]["_source"]["color_mode"] for name in SPECIAL}
    assert modes == SPECIAL

    inferred = chaos.cli(*infer_args(dataset, model_version), timeout=900)
    assert inferred.returncode == 0, inferred.tail()
    assert "Traceback" not in inferred.stderr, inferred.tail()
    summary = read_json_line(inferred.stdout)
    assert summary["images"] == len(good) and summary["errors"] == 0 and summary["failed"] == 0, summary
    problems = prediction_problems(dataset_docs(es, index, dataset), model_version)
    assert not problems, problems
    ledger.record(
        "bad input (truncated, 0 bytes, text as .jpg, decompression bomb, symlink, duplicate) "
        "beside unusual good files (alpha, gray, CMYK, 16-bit, spaces/Unicode) through upload + infer",
        f"{len(files)} files: {len(BAD)} refused with their reason, {len(good)} uploaded and predicted",
        len(good) - len(docs) + len(problems),
    )


def test_infer_of_an_unknown_dataset_fails_with_one_line(chaos: ChaosStack, model_version: str):
    """A dataset with no images is bad input too: a one-line error naming it, no traceback."""
    dataset = chaos.dataset("no-such-dataset")
    run = chaos.cli(*infer_args(dataset, model_version), timeout=600)
    assert run.returncode != 0, run.tail()
    assert "Traceback" not in run.stderr, f"crashed instead of a one-line error:\n{run.tail()}"
    errors = [ln for ln in run.stderr.splitlines() if " ERROR " in ln]
    assert any(dataset in ln for ln in errors), f"no error line naming {dataset}:\n{run.tail()}"
