"""A deterministic generator of a Fruits-360-like dataset (no dataset can be downloaded here).

Layout, as in Fruits-360: `<out>/Training/<Class name>/<i>_<size>.jpg` and `<out>/Test/...`,
square RGB JPEGs of one fruit on a white background. Each class has its own shape, colour,
texture, stem/leaf and size range; every image is a random view of it (rotation, scale, offset,
lighting, colour jitter, sensor noise). Similar templates (red apple / cherry / tomato, lemon /
golden apple, lime / granny smith) and colour variants of one template overlap, so a classifier
has to learn shape and texture and cannot reach 100 % trivially on colour alone.

Determinism: every image draws from its own numpy RNG seeded with (seed, class, split, index),
all drawing is numpy + Pillow resampling, and JPEGs are written with fixed settings and no
metadata, so the same arguments give byte-identical files on the same Pillow/libjpeg build.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

SPLIT_DIRS = {"train": "Training", "test": "Test"}
_SPLIT_CODES = {"train": 0, "test": 1}
JPEG_QUALITY = 92
SUPERSAMPLE = 2  # draw at 2x and downsample: cheap anti-aliasing


@dataclass(frozen=True)
class Template:
    """The look of one kind of fruit; classes are templates plus a per-class variant shift."""

    name: str
    shape: str  # ellipse | pear | cone | crescent | oblong
    rgb: tuple[int, int, int]
    texture: str  # smooth | speckle | streaks | pores | stripes | seeds | fuzz | bumps
    size: tuple[float, float]  # body height as a fraction of the canvas
    aspect: float = 1.0  # width / height
    stem: str = "none"  # none | stem | long | leaf | crown | cap
    accent: tuple[int, int, int] = (0, 0, 0)  # texture / blush colour


TEMPLATES: tuple[Template, ...] = (
    Template("Apple Red", "ellipse", (172, 28, 32), "streaks", (0.62, 0.80), 1.05, "stem", (220, 170, 60)),
    Template("Banana", "crescent", (232, 205, 62), "stripes", (0.70, 0.88), 1.0, "none", (110, 90, 30)),
    Template("Orange", "ellipse", (244, 140, 22), "pores", (0.64, 0.82), 1.0, "none", (200, 100, 10)),
    Template("Lemon", "ellipse", (242, 222, 58), "pores", (0.56, 0.72), 1.30, "none", (200, 180, 30)),
    Template("Lime", "ellipse", (108, 168, 44), "pores", (0.48, 0.62), 1.10, "none", (80, 130, 30)),
    Template("Cherry", "ellipse", (140, 12, 32), "smooth", (0.34, 0.46), 1.0, "long", (90, 0, 20)),
    Template("Strawberry", "cone", (208, 32, 42), "seeds", (0.56, 0.72), 0.85, "leaf", (240, 220, 120)),
    Template("Pear", "pear", (188, 198, 78), "speckle", (0.70, 0.86), 0.72, "stem", (140, 120, 50)),
    Template("Kiwi", "ellipse", (128, 98, 52), "fuzz", (0.52, 0.66), 1.25, "none", (90, 70, 35)),
    Template("Tomato", "ellipse", (218, 42, 30), "smooth", (0.58, 0.76), 1.15, "leaf", (250, 120, 90)),
    Template("Apple Golden", "ellipse", (222, 190, 64), "speckle", (0.60, 0.78), 1.05, "stem", (200, 150, 50)),
    Template("Apple Granny Smith", "ellipse", (124, 192, 72), "speckle", (0.60, 0.78), 1.05, "stem", (200, 220, 140)),
    Template("Plum", "ellipse", (92, 32, 82), "smooth", (0.46, 0.60), 0.90, "stem", (140, 100, 150)),
    Template("Peach", "ellipse", (240, 168, 112), "fuzz", (0.58, 0.74), 1.0, "none", (220, 70, 60)),
    Template("Avocado", "pear", (62, 84, 34), "bumps", (0.66, 0.84), 0.68, "stem", (40, 55, 20)),
    Template("Eggplant", "oblong", (74, 30, 86), "smooth", (0.80, 0.92), 0.45, "cap", (60, 110, 40)),
    Template("Cucumber", "oblong", (52, 112, 42), "stripes", (0.84, 0.94), 0.32, "none", (120, 170, 80)),
    Template("Pomegranate", "ellipse", (168, 40, 48), "speckle", (0.66, 0.82), 1.0, "crown", (200, 120, 90)),
    Template("Mango", "pear", (236, 178, 58), "smooth", (0.66, 0.82), 0.80, "none", (150, 170, 50)),
    Template("Blueberry", "ellipse", (58, 66, 118), "smooth", (0.30, 0.40), 1.05, "crown", (120, 130, 170)),
)


@dataclass(frozen=True)
class ClassSpec:
    """One class of the generated dataset: a template with this class's colour and size shift."""

    name: str
    template: Template
    rgb: tuple[float, float, float]
    size: tuple[float, float]
    aspect: float


@dataclass
class SynthSummary:
    """What `synthesize` wrote."""

    out: Path
    classes: list[str] = field(default_factory=list)
    files: int = 0
    bytes: int = 0


def class_specs(classes: int, seed: int) -> list[ClassSpec]:
    """The first `classes` classes: templates in order, then numbered colour/size variants."""
    specs = []
    for index in range(classes):
        template = TEMPLATES[index % len(TEMPLATES)]
        variant = index // len(TEMPLATES)
        rng = np.random.default_rng([seed, 1_000_003, index])
        shift = rng.normal(0, 10 + 14 * min(variant, 1), 3)  # variants drift further
        scale = 1.0 + (rng.uniform(-0.08, 0.08) if variant else 0.0)
        name = template.name if variant == 0 else f"{template.name} {variant + 1}"
        red, green, blue = (float(np.clip(c + s, 8, 250)) for c, s in zip(template.rgb, shift, strict=True))
        specs.append(
            ClassSpec(
                name=name,
                template=template,
                rgb=(red, green, blue),
                size=(template.size[0] * scale, min(template.size[1] * scale, 0.95)),
                aspect=template.aspect * float(rng.uniform(0.95, 1.05)),
            )
        )
    return specs


def image_rng(seed: int, class_index: int, split: str, index: int) -> np.random.Generator:
    """The RNG of one image: independent of generation order, so any subset is reproducible."""
    return np.random.default_rng([seed, class_index, _SPLIT_CODES[split], index])


def _grid(n: int, centre: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates in [-1, 1] relative to the fruit's centre."""
    axis = (np.arange(n, dtype=np.float32) + 0.5) / n * 2 - 1
    y, x = np.meshgrid(axis, axis, indexing="ij")
    return x - centre[0], y - centre[1]


def _smooth_mask(distance: np.ndarray, n: int) -> np.ndarray:
    """Anti-aliased inside mask from an implicit function (< 1 inside)."""
    edge = 3.0 / n
    return np.clip((1.0 - distance) / edge, 0.0, 1.0)


def _body_distance(shape: str, x: np.ndarray, y: np.ndarray, a: float, b: float) -> np.ndarray:
    """Implicit function of the fruit body (half-width a, half-height b): < 1 inside."""
    if shape == "ellipse":
        return np.sqrt((x / a) ** 2 + (y / b) ** 2)
    if shape == "oblong":  # a superellipse: flat sides, round ends
        return (np.abs(x / a) ** 2.6 + np.abs(y / b) ** 2.6) ** (1 / 2.6)
    if shape == "pear":  # a big bottom lobe blended with a small top lobe
        bottom = np.sqrt((x / a) ** 2 + ((y - 0.35 * b) / (0.65 * b)) ** 2)
        top = np.sqrt((x / (0.6 * a)) ** 2 + ((y + 0.45 * b) / (0.55 * b)) ** 2)
        return np.minimum(bottom, top)
    if shape == "cone":  # strawberry: wide shoulders, pointed bottom
        t = np.clip((y / b + 1) / 2, 0, 1)
        half_width = a * np.clip(1.15 - t**1.6, 0.02, 1.0)
        return np.maximum(np.abs(x) / half_width, np.abs(y) / b)
    if shape == "crescent":  # banana: a disc minus an offset disc
        outer = np.sqrt((x / a) ** 2 + ((y + 0.15 * b) / b) ** 2)
        inner = np.sqrt((x / (0.95 * a)) ** 2 + ((y + 0.62 * b) / (0.9 * b)) ** 2)
        return np.maximum(outer, 2.0 - inner)
    raise ValueError(f"unknown shape {shape!r}")


def _low_freq_noise(n: int, rng: np.random.Generator, cells: int) -> np.ndarray:
    """Smooth noise in [-1, 1]: a small random grid upsampled with bicubic resampling."""
    coarse = rng.uniform(0, 255, (cells, cells)).astype(np.uint8)
    big = Image.fromarray(coarse).resize((n, n), Image.Resampling.BICUBIC)
    return np.asarray(big, dtype=np.float32) / 127.5 - 1.0


def _texture(
    kind: str, x: np.ndarray, y: np.ndarray, box: tuple[float, float, float, float], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(brightness multiplier, accent-colour weight in [0, 1]) of the surface texture.

    x, y are body coordinates (the body spans [-1, 1]); box = (centre x, centre y, a, b) in
    canvas coordinates, for textures drawn in pixel space.
    """
    n = x.shape[0]
    shade = np.ones_like(x)
    accent = np.zeros_like(x)
    if kind == "streaks":
        phase = rng.uniform(0, 6.3)
        accent = (
            np.clip(0.5 + 0.5 * np.sin(x * rng.uniform(14, 22) + phase + 2 * _low_freq_noise(n, rng, 6)), 0, 1) * 0.35
        )
    elif kind == "stripes":
        shade = 1.0 + 0.08 * np.sin(x * rng.uniform(10, 16) + rng.uniform(0, 6.3))
    elif kind in ("pores", "fuzz", "bumps"):
        cells = {"pores": 48, "fuzz": 64, "bumps": 20}[kind]
        depth = {"pores": 0.07, "fuzz": 0.10, "bumps": 0.16}[kind]
        shade = 1.0 + depth * _low_freq_noise(n, rng, cells)
    elif kind in ("speckle", "seeds"):
        accent = _dots(kind, n, box, rng)
    if kind in ("streaks", "speckle") or kind == "fuzz":  # blush: a broad patch of accent colour
        bx, by = rng.uniform(-0.6, 0.6, 2)
        accent = np.maximum(accent, 0.35 * np.clip(1 - np.hypot(x - bx, y - by) / 0.7, 0, 1))
    return shade, accent


def _dots(kind: str, n: int, box: tuple[float, float, float, float], rng: np.random.Generator) -> np.ndarray:
    """Speckles or seeds over the body: discs drawn by Pillow (a numpy loop is 10x slower)."""
    count = int(rng.integers(25, 45)) if kind == "seeds" else int(rng.integers(30, 80))
    cx0, cy0, a, b = box
    radius = (0.035 if kind == "seeds" else 0.02) * max(a, b) * n / 2
    layer = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(layer)
    for u, v in rng.uniform(-0.9, 0.9, (count, 2)):
        px, py = (cx0 + u * a + 1) * n / 2, (cy0 + v * b + 1) * n / 2
        draw.ellipse((px - radius, py - radius, px + radius, py + radius), fill=255)
    return np.asarray(layer, np.float32) / 255.0


def _lighting(x: np.ndarray, y: np.ndarray, a: float, b: float, rng: np.random.Generator) -> np.ndarray:
    """Diffuse shading with a highlight towards a random upper light direction."""
    lx, ly = rng.uniform(-0.5, 0.2), rng.uniform(-0.6, -0.2)
    r = np.sqrt(((x - lx * a) / a) ** 2 + ((y - ly * b) / b) ** 2)
    return 1.18 - 0.42 * np.clip(r, 0, 1.6) ** 1.5


def _draw_stem(
    canvas: np.ndarray, x: np.ndarray, y: np.ndarray, top: float, kind: str, rng: np.random.Generator
) -> None:
    """Paint the stem / leaf / crown / cap above (or at) the body top, in place."""
    if kind == "none":
        return
    brown = np.array([96, 64, 30], np.float32) * rng.uniform(0.8, 1.2)
    green = np.array([64, 132, 40], np.float32) * rng.uniform(0.8, 1.2)
    lean = rng.uniform(-0.25, 0.25)
    if kind in ("stem", "long"):
        length = 0.16 if kind == "stem" else 0.42
        t = np.clip((top - y) / length, 0, 1)
        along = (y < top + 0.04) & (y > top - length)
        mask = along & (np.abs(x - lean * t * length) < 0.022)
        canvas[mask] = brown
    elif kind == "leaf":
        leaf = ((x - 0.12) / 0.22) ** 2 + ((y - top - 0.02) / 0.07) ** 2 < 1
        leaf |= ((x + 0.12) / 0.22) ** 2 + ((y - top - 0.02) / 0.07) ** 2 < 1
        canvas[leaf] = green
    elif kind == "crown":
        crown = (np.abs(x) < 0.10) & (np.abs(y - top - 0.02) < 0.05)
        canvas[crown] = brown * 0.8
    elif kind == "cap":
        cap = (np.abs(x) < 0.08) & (y < top + 0.08) & (y > top - 0.08)
        canvas[cap] = green * 0.8


def render(spec: ClassSpec, rng: np.random.Generator, size: int = 100) -> Image.Image:
    """One random view of `spec` as a `size` x `size` RGB image on a white background."""
    n = size * SUPERSAMPLE
    centre = tuple(rng.uniform(-0.06, 0.06, 2))
    x, y = _grid(n, centre)
    height = rng.uniform(*spec.size)
    b = height
    a = height * spec.aspect * rng.uniform(0.94, 1.06)
    scale = max(a, b)
    if scale > 0.95:  # keep the fruit inside the canvas
        a, b = a * 0.95 / scale, b * 0.95 / scale
    inside = _smooth_mask(_body_distance(spec.template.shape, x, y, a, b), n)
    colour = np.array(spec.rgb, np.float32) * rng.uniform(0.88, 1.08) + rng.normal(0, 9, 3)
    accent_rgb = np.array(spec.template.accent, np.float32)
    shade, accent = _texture(spec.template.texture, x / a, y / b, (*centre, a, b), rng)
    light = _lighting(x, y, a, b, rng)
    body = (colour * (1 - accent[..., None]) + accent_rgb * accent[..., None]) * (shade * light)[..., None]
    canvas = np.full((n, n, 3), 255.0, np.float32)
    canvas = canvas * (1 - inside[..., None]) + body * inside[..., None]
    _draw_stem(canvas, x, y, -b, spec.template.stem, rng)
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    image = image.resize((size, size), Image.Resampling.LANCZOS)
    # Rotated views, as the fruit turns on the Fruits-360 rig (rotating the small image is 4x cheaper).
    image = image.rotate(float(rng.uniform(0, 360)), Image.Resampling.BICUBIC, fillcolor=(255, 255, 255))
    pixels = np.asarray(image, np.float32) + rng.normal(0, rng.uniform(1.5, 5.0), (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def encode_jpeg(image: Image.Image) -> bytes:
    """JPEG bytes with fixed settings and no metadata (so output is byte-reproducible)."""
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=JPEG_QUALITY, optimize=False, progressive=False, subsampling=0)
    return buffer.getvalue()


def file_name(index: int, size: int) -> str:
    """Fruits-360-style file name of image `index`."""
    return f"{index}_{size}.jpg"


def write_if_changed(path: Path, data: bytes) -> bool:
    """Write `data` unless the file already holds exactly it; True if written."""
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)  # atomic: a killed generator never leaves a half-written JPEG
    return True


def write_class(
    out: Path, spec: ClassSpec, class_index: int, counts: dict[str, int], size: int, seed: int
) -> tuple[int, int]:
    """Write every image of one class; returns (files, bytes)."""
    files = total = 0
    for split, count in counts.items():
        folder = out / SPLIT_DIRS[split] / spec.name
        for index in range(count):
            data = encode_jpeg(render(spec, image_rng(seed, class_index, split, index), size))
            write_if_changed(folder / file_name(index, size), data)
            files += 1
            total += len(data)
    return files, total


def synthesize(
    out: Path,
    classes: int = 10,
    per_class: int = 50,
    test_per_class: int = 20,
    size: int = 100,
    seed: int = 0,
    workers: int = 1,
    progress: Callable[[int], object] | None = None,
) -> SynthSummary:
    """Write the dataset under `out` (one process per class when workers > 1).

    Returns what was written; re-running with the same arguments rewrites nothing, and the
    output does not depend on `workers` (every image has its own RNG).
    """
    if classes < 1 or size < 16 or per_class < 0 or test_per_class < 0:
        raise ValueError("need classes >= 1, size >= 16 and non-negative image counts")
    specs = class_specs(classes, seed)
    counts = {"train": per_class, "test": test_per_class}
    summary = SynthSummary(out=out, classes=[spec.name for spec in specs])
    jobs = [(out, spec, index, counts, size, seed) for index, spec in enumerate(specs)]
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = pool.map(write_class, *zip(*jobs, strict=True))
            _add_results(summary, results, progress)
    else:
        _add_results(summary, (write_class(*job) for job in jobs), progress)
    log.info("synthesized %d images of %d classes under %s", summary.files, classes, out)
    return summary


def _add_results(
    summary: SynthSummary, results: Iterable[tuple[int, int]], progress: Callable[[int], object] | None
) -> None:
    for files, total in results:
        summary.files += files
        summary.bytes += total
        if progress is not None:
            progress(files)
