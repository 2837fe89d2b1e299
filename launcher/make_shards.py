"""Make SAM-DiffSR WebDataset shards from an image folder (no arguments: the demo). See --help."""

import sys

from samdiffsr.sharding.cli import main

if __name__ == "__main__":
    sys.exit(main())
