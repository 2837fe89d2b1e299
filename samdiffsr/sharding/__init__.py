"""The offline sharding job: image folder -> aligned HR / LR / SPE-mask tiles -> WebDataset tar shards.

Run it with ``launcher/make_shards.py`` (:mod:`samdiffsr.sharding.cli`); the sample format it writes is
:mod:`samdiffsr.data.reader`'s, the only thing it takes from the training read path. See docs/sharding.md.
"""
