"""Super-resolve a folder of LR images with a SAM-DiffSR checkpoint. See --help."""

from samdiffsr.evaluation.infer_cli import main

if __name__ == "__main__":
    raise SystemExit(main())
