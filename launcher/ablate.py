"""Paired ablation: arms x seeds trained, scored and compared with bootstrap intervals. See --help."""

import sys

from samdiffsr.ablation.cli import main

if __name__ == "__main__":
    sys.exit(main())
