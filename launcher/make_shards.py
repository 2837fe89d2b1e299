"""Make SAM-DiffSR WebDataset shards from an image folder (no arguments: the demo). See --help."""

import sys

from samdiffsr.demo.photos import make_shards_command

if __name__ == "__main__":
    sys.exit(make_shards_command())
