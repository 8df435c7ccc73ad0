"""`python -m orchard` entry point."""

import sys

from orchard.app.cli import main

sys.exit(main())
