"""`python -m spark_app <train|infer|features|search> ...`, also the script for spark-submit:

    PYTHONPATH=$PWD spark-submit spark_app/__main__.py infer --dataset fruits --model VERSION

(the session ships the packages to the executors itself; spark-submit's --master/--conf are kept
unless settings set the same keys).
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file by spark-submit: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchard.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
