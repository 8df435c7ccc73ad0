"""The driver program spark-submit runs: the `orchard` CLI, unchanged (e.g. `train`, `infer`).

A separate file (not orchard/__main__.py) so the script's own directory, which Python puts first
on sys.path, is not the orchard package itself.
"""

from orchard.app.cli import run

run()
