"""The whole pipeline on built-in photos: shards -> RRDB -> SAM-DiffSR (2 ranks) -> benchmark table."""

from samdiffsr.demo import main

if __name__ == "__main__":
    raise SystemExit(main())
