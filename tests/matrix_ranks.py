"""The 2-rank cases of the configuration matrix in one torchrun launch (tests/test_training_matrix.py).

    torchrun --nproc_per_node 2 tests/matrix_ranks.py OUT.pt RRDB.pt CASE [CASE ...]    CASE: fp32,0,1,2

Every rank runs every case in turn (``deepspeed.initialize`` again in the one process group); rank 0 saves
``{case name: engine_run record}`` to OUT.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import matrix_reference as matrix  # noqa: E402  (tests/ is not a package)

from samdiffsr.train.collective import exit_process, init_distributed  # noqa: E402


def parse_case(text: str) -> tuple[str, int, int, int]:
    precision, zero, accum, ranks = text.split(",")
    return precision, int(zero), int(accum), int(ranks)


def main(out: str, rrdb: str, *cases: str) -> None:
    rank, world_size, device = init_distributed()
    batches = matrix.make_batches()
    records = {}
    for case in map(parse_case, cases):
        cfg = matrix.case_config(case, rrdb)
        records[matrix.case_name(case)] = matrix.engine_run(cfg, rank, world_size, batches, device,
                                                            run_dir=str(Path(out).parent / matrix.case_name(case)))
    if rank == 0:
        torch.save(records, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
    exit_process(0)  # as a training process ends (samdiffsr.train.engine.process_main): no teardown abort
