"""Train SAM-DiffSR or its RRDB: `python launcher/train.py --config configs/demo.yaml [key=value ...]`.

Also under `torchrun --nproc_per_node N` or `deepspeed --num_gpus N` (DS_ACCELERATOR=cpu without GPUs);
the `--local_rank` the deepspeed launcher passes is accepted. See samdiffsr/train/engine.py and docs/training.md.
"""

from samdiffsr.train.engine import process_main

if __name__ == "__main__":
    process_main()
