"""Benchmark: decoding a JPEG into the model's input, as every stage does it (train, infer, features,
serve: orchard.spark_app.images.decode_image), against a full decode then the same resize.

decode_image lets libjpeg decode at 1/2, 1/4 or 1/8 scale when that still leaves the model's size
(`shrink_while_decoding`); the baseline decodes every pixel first (what Orchard did before). Photos
are synthetic but photo-like (smooth scene + sensor noise, quality 90) at the sizes users post:
100x100 (the fruit dataset), VGA, full HD and a 12 MP phone photo. Per size, same run, alternating
rounds: milliseconds per image of each path, their ratio, and how far apart the pixels are (mean and
max absolute difference, 0-255 levels). Last line of stdout: one JSON object.

    PYTHONPATH=. ~/.cache/orchard/venv/bin/python bench/decode.py [--size 100 --rounds 5]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import time

import numpy as np
from PIL import Image

from orchard.spark_app.images import decode_image

log = logging.getLogger("bench.decode")
PHOTOS = ((100, 100), (640, 480), (1920, 1080), (4032, 3024))  # (width, height)


def photo(width: int, height: int, seed: int = 0) -> bytes:
    """A photo-like JPEG: smooth colour fields over the frame plus Gaussian noise (sigma 6 levels)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    scene = np.stack([np.sin(6 * x + 1), np.cos(5 * y), np.sin(4 * (x + y))], -1) * 90 + 128
    scene += rng.normal(0, 6, scene.shape)
    buffer = io.BytesIO()
    Image.fromarray(scene.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def full_decode(content: bytes, size: tuple[int, int]) -> np.ndarray:
    """The baseline: every pixel decoded, then the same RGB conversion and bilinear resize."""
    image = Image.open(io.BytesIO(content)).convert("RGB")
    return np.asarray(image.resize((size[1], size[0]), Image.Resampling.BILINEAR), dtype=np.uint8)


def seconds_per_image(decode, content: bytes, size: tuple[int, int], budget: float) -> float:
    """Mean seconds of decode(content, size) over as many calls as fit in `budget` seconds (>= 3)."""
    calls, began = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - began < budget:
        decode(content, size)
        calls += 1
    return (time.perf_counter() - began) / calls


def measure(width: int, height: int, size: tuple[int, int], rounds: int, budget: float) -> dict:
    """Both paths on one photo, alternating for `rounds` rounds: ms per image, ratio, pixel distance."""
    content = photo(width, height)
    ours, baseline = [], []
    for _ in range(rounds):
        ours.append(seconds_per_image(decode_image, content, size, budget))
        baseline.append(seconds_per_image(full_decode, content, size, budget))
    difference = np.abs(decode_image(content, size).astype(int) - full_decode(content, size).astype(int))
    ours_ms, baseline_ms = 1000 * float(np.median(ours)), 1000 * float(np.median(baseline))
    return {
        "photo": f"{width}x{height}",
        "jpeg_bytes": len(content),
        "decode_image_ms": round(ours_ms, 2),
        "full_decode_ms": round(baseline_ms, 2),
        "speedup": round(baseline_ms / ours_ms, 2),
        "mean_abs_diff": round(float(difference.mean()), 3),
        "max_abs_diff": int(difference.max()),
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=100, help="the model's input (square), pixels")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per photo")
    parser.add_argument("--budget", type=float, default=0.5, help="seconds per path per round")
    o = parser.parse_args(argv)
    rows = []
    for width, height in PHOTOS:
        rows.append(measure(width, height, (o.size, o.size), o.rounds, o.budget))
        log.info("%s", json.dumps(rows[-1]))
    print(json.dumps({"input_size": o.size, "photos": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
