"""Entry point of `python -m cases` (see cases.cli)."""

import sys

from cases.cli import main

sys.exit(main())
