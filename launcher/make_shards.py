"""Make SAM-DiffSR WebDataset shards from an image folder (no arguments: the demo). See --help."""

import sys

from samdiffsr.data.shardwriter import main

if __name__ == "__main__":
    sys.exit(main())
