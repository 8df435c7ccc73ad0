"""The bag-of-visual-words family vs Orchard's CNN from scratch on one synthetic split: accuracy,
training time and inference images/s, every step a real CLI command on the running stack.

One run, one dataset (`bench-bovw-<seed>`: --classes x --per-class train + --test-per-class test
100x100 JPEGs written by `orchard dataset synth`, uploaded with the real uploader), in this order:

  cnn         `orchard train` (the CNN from scratch, --cnn-epochs)
  bovw_sift   `orchard train --family bovw --descriptor sift` (256 words, 50 keypoints)
  bovw_orb    `orchard train --family bovw --descriptor orb`
  then `orchard infer --force` with each version (every image predicted and written).

Rates are images / the command's own `seconds` (Spark session start excluded). Prints one JSON line
per step and, last, one JSON object with the figures and the ratios `accuracy_<x>_minus_cnn`,
`training_seconds_<x>_over_cnn` and `infer_ips_<x>_over_cnn` for x in bovw_sift, bovw_orb.

  PYTHONPATH=. python bench/bovw.py [--classes 10 --per-class 100 --test-per-class 30]

Synthetic images are smoother than photos (fewer keypoints): the figures compare the families on
this data, they do not predict accuracy on real photos. Needs the stack (`bin/orchard stack up`);
leaves the dataset's objects, rows and versions in place.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

from transfer import orchard, parse_args, prepare, report_steps, split_facts, train_step

FAMILIES = ("bovw_sift", "bovw_orb")


def infer_step(name: str, dataset: str, version: str) -> dict:
    """One `orchard infer --force` run's figures."""
    summary, wall = orchard("infer", "--dataset", dataset, "--model", version, "--force", "--json")
    assert summary is not None
    return {
        "step": f"infer_{name}",
        "images": summary["images"],
        "errors": summary["errors"],
        "seconds": summary["seconds"],
        "images_per_second": summary["images_per_second"],
        "wall_seconds": round(wall, 1),
    }


def ratios(by: dict) -> dict:
    """Each BoVW descriptor's figures relative to the CNN's."""
    out = {}
    for x in FAMILIES:
        out[f"accuracy_{x}_minus_cnn"] = round(by[x]["test_accuracy"] - by["cnn"]["test_accuracy"], 4)
        out[f"training_seconds_{x}_over_cnn"] = round(by[x]["training_seconds"] / by["cnn"]["training_seconds"], 3)
        rate, cnn_rate = by[f"infer_{x}"]["images_per_second"], by["infer_cnn"]["images_per_second"]
        out[f"infer_ips_{x}_over_cnn"] = round(rate / cnn_rate, 3)
    return out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    o = parse_args(argv)
    seed = o.seed if o.seed is not None else int(time.time()) % 1_000_000
    with tempfile.TemporaryDirectory(prefix="orchard-bench-bovw-") as tmp:
        dataset = prepare(o, seed, Path(tmp), "bench-bovw")
    steps = [
        train_step("cnn", dataset, o.cnn_epochs),
        train_step("bovw_sift", dataset, 1, "--family", "bovw", "--descriptor", "sift"),
        train_step("bovw_orb", dataset, 1, "--family", "bovw", "--descriptor", "orb"),
    ]
    steps += [infer_step(step["step"], dataset, step["version"]) for step in list(steps)]
    by = report_steps(steps)
    result = {
        **split_facts(o, dataset),
        "steps": by,
        **ratios(by),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
