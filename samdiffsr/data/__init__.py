"""The training read path: the shard sample format, tar and shard-list reading, the training stream and
held-out image pairs. The offline job that writes shards is :mod:`samdiffsr.sharding`."""
