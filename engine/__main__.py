"""`python -m engine` entry point."""

import sys

from engine.cli import main

sys.exit(main())
