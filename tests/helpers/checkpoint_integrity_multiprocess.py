"""One of two processes of a multi-host CPU job (tests/test_checkpoint.py starts both):

  checkpoint_integrity_multiprocess.py PROCESS_ID PORT DIR

Both save steps 1, 2, 3 of a state sharded across the two processes (every process writes its
own shards; process 0 writes the integrity manifests). Process 0 then flips one byte in an
array file of step 3 and, after a barrier, both restore: process 0 finds the mismatch, the
verdict is agreed by both, both fall back to step 2 together (a process restoring alone would
hang in orbax's barriers) and step 3 is moved aside once. Prints one JSON line.
"""
import json
import os
import pathlib

from two_processes import DIRECTORY, PROCESS_ID, make_state as _make_state  # Joins first.

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from rlhf_jax.train.checkpoint import Checkpointer, abstract_like  # noqa: E402


def make_state(step):
  return _make_state(step, 256)


with Checkpointer(DIRECTORY, save_every=1, keep=3) as ckpt:
  for step in (1, 2, 3):
    assert ckpt.maybe_save(step, make_state(step), {"step": step})
# close() returns on each process when its own work is done; process 0's manifest of the last
# step may still be in writing when process 1 gets here.
multihost_utils.sync_global_devices("saved")
manifests = sorted(p.parent.name for p in pathlib.Path(DIRECTORY).glob("*/integrity.json"))
if PROCESS_ID == 0:
  step_dir = pathlib.Path(DIRECTORY) / "3"
  target = max((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)
  data = bytearray(target.read_bytes())
  data[len(data) // 2] ^= 0x01
  target.write_bytes(bytes(data))
multihost_utils.sync_global_devices("flipped")

with Checkpointer(DIRECTORY, save_every=1, keep=3) as ckpt:
  step, state, extra = ckpt.restore_latest(abstract_like(make_state(0)))
  steps = ckpt.steps
local = np.concatenate([np.asarray(s.data) for s in state["w"].addressable_shards])
quarantine = pathlib.Path(f"{DIRECTORY}.quarantine")
print(json.dumps({"process": PROCESS_ID, "manifests": manifests, "restored_step": step,
                  "extra": extra, "steps": steps, "local_values": sorted(set(local.tolist())),
                  "quarantined": sorted(os.listdir(quarantine)) if quarantine.exists() else []}))
