"""Submit training, the make_shards array or a benchmark sweep to Slurm (submitit). See --help.

    python launcher/submit.py --config configs/samdiffsr_df2k4x.yaml --nodes 2 --gpus-per-node 8
"""

from samdiffsr.cluster.submit import main

if __name__ == "__main__":
    raise SystemExit(main())
