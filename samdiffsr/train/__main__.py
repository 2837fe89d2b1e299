"""``python -m samdiffsr.train --config C [key=value ...]``: the same as ``launcher/train.py``, without the
repository (what the DeepSpeed launcher runs with ``--module``; see :mod:`samdiffsr.train.launch`)."""

from samdiffsr.train.engine import process_main

if __name__ == "__main__":
    process_main()
