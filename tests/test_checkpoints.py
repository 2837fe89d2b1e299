"""Resuming from a damaged run folder: the newest checkpoint that loads is used, never a silent fresh start.

Real runs of the engine in one process (DeepSpeed on CPU), with real files damaged the ways a crash, a
full disk or a bad copy damage them.
"""

from __future__ import annotations

import logging
import pickle
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from train_helpers import REPO, TINY, write_rrdb_weights, write_shards

from samdiffsr.io import torch_load
from samdiffsr.train import checkpoints
from samdiffsr.train.engine import main

STEP2, STEP4 = checkpoints.tag_for(2), checkpoints.tag_for(4)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("data")
    return {"shards": write_shards(root / "train"), "rrdb": write_rrdb_weights(root / "rrdb.pt")}


def run(data: dict[str, str], run_dir: Path, *extra: str) -> dict:
    return main(["--config", str(REPO / "configs" / "demo.yaml"), *TINY, "data.workers=0",
                 f"data.train_shards={data['shards']}", "data.val_shards=", f"train.rrdb_ckpt={data['rrdb']}",
                 f"train.run_dir={run_dir}", "train.ckpt_every=2", "train.keep_last=5", *extra])


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {  # name -> (damage the run folder, the checkpoint resumed from, what the warning says)
    "truncated model file": (lambda d: truncate(d / STEP4 / "mp_rank_00_model_states.pt"), STEP2,
                             f"not resuming from it: cannot load checkpoint {{d}}/{STEP4}: RuntimeError"),
    "missing complete.json": (lambda d: (d / STEP4 / checkpoints.COMPLETE).unlink(), STEP2,
                              f"{{d}}/latest names '{STEP4}', but {{d}}/{STEP4} is missing or incomplete"),
    "truncated rng file": (lambda d: truncate(d / STEP4 / "rng_rank0.pt"), STEP2,
                           f"{{d}}/{STEP4}/rng_rank0.pt: not a readable checkpoint, damaged or truncated ("),
    "garbage latest": (lambda d: (d / "latest").write_bytes(b"\x00\xffPK garbage\n"), STEP4,
                       "{d}/latest is garbled (it holds '\\x00"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_auto_resume_falls_back_to_the_newest_checkpoint_that_loads(data, tmp_path, caplog, damage):
    run(data, tmp_path, "train.max_steps=4")
    ckpt_dir = tmp_path / "checkpoints"
    spoil, expected, warning = DAMAGE[damage]
    spoil(ckpt_dir)
    with caplog.at_level(logging.WARNING):
        out = run(data, tmp_path, "train.max_steps=6")
    assert out["resumed_from"] == str(ckpt_dir / expected) and out["step"] == 6
    assert warning.format(d=ckpt_dir) in caplog.text
    assert (ckpt_dir / "latest").read_text() == checkpoints.tag_for(6)


def test_no_loadable_checkpoint_is_an_error_naming_it_not_a_fresh_start(data, tmp_path):
    run(data, tmp_path, "train.max_steps=2")
    rng_file = tmp_path / "checkpoints" / STEP2 / "rng_rank0.pt"
    truncate(rng_file)
    with pytest.raises(checkpoints.CheckpointError, match=f"no checkpoint could be loaded .*{rng_file}"):
        run(data, tmp_path, "train.max_steps=4")
    truncate(tmp_path / "checkpoints" / STEP2 / "mp_rank_00_model_states.pt")
    with pytest.raises(checkpoints.CheckpointError, match=f"cannot load checkpoint {tmp_path / 'checkpoints' / STEP2}"):
        run(data, tmp_path, "train.max_steps=4")
    (tmp_path / "checkpoints" / STEP2 / checkpoints.COMPLETE).unlink()
    with pytest.raises(checkpoints.CheckpointError, match="none is complete"):
        run(data, tmp_path, "train.max_steps=4")
    assert not (tmp_path / "checkpoints" / checkpoints.tag_for(4)).exists()


NOT_TORCH = "not a checkpoint (neither a torch zip file nor a pickle)"
REFUSED = ("not a checkpoint, or one holding objects other than tensors and plain containers "
           "(refused by the safe loader)")
BAD_FILES = {  # name -> (bytes, or a function writing the file; what the error says after "PATH: ")
    # Seeded, not os.urandom: which error a garbled pickle raises depends on its bytes, and a test must not flake.
    "random bytes": (random.Random(0).randbytes(4096), NOT_TORCH),
    "zeros": (bytes(4096), NOT_TORCH),
    "an HTML page": (b"<!DOCTYPE html><html><body>Sign in</body></html>", NOT_TORCH),
    "a garbled pickle": (b"\x80\x04" + random.Random(0).randbytes(256), REFUSED),
    "a garbled pickle that underflows its stack": (b"\x80\x04" + random.Random(2).randbytes(256),
                                                   "not a readable checkpoint, damaged or truncated "
                                                   "(pop from empty list)"),
    "a pickle of other objects": (pickle.dumps(Counter(a=1)), REFUSED),
    "a truncated torch file": (lambda p: (torch.save({"rng": torch.zeros(64)}, p), truncate(p)),
                               "not a readable checkpoint, damaged or truncated (PytorchStreamReader failed "
                               "reading zip archive: failed finding central directory)"),
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_torch_load_names_the_file_and_never_passes_on_torchs_unsafe_advice(tmp_path, kind):
    content, says = BAD_FILES[kind]
    path = tmp_path / "rng_rank0.pt"
    if callable(content):
        content(path)
    else:
        path.write_bytes(content)
    with pytest.raises(checkpoints.CheckpointError) as err:
        torch_load(path, checkpoints.CheckpointError, "RNG state file")
    assert str(err.value) == f"{path}: {says}"  # one line; never torch's "weights_only=False" advice
    with pytest.raises(checkpoints.CheckpointError) as err:
        torch_load(tmp_path / "gone.pt", checkpoints.CheckpointError, "RNG state file")
    assert str(err.value) == f"RNG state file not found: {tmp_path / 'gone.pt'}"
