"""One of two processes of a multi-host CPU job (tests/test_checkpoint.py starts both):

  checkpoint_preempt_multiprocess.py PROCESS_ID PORT DIR

Both run a loop over a state sharded across the two processes. Process 1 gets SIGTERM at step 5;
JAX's preemption service tells both processes, `PreemptionGuard.should_stop` turns True on both
at the same step, both force-save that step together (orbax's barriers would hang if only one
did), then a fresh Checkpointer restores it. Prints one JSON line.
"""
import json
import os
import signal
import time

from two_processes import DIRECTORY, PROCESS_ID, make_state as _make_state  # Joins first.

import numpy as np  # noqa: E402
from rlhf_jax.train.checkpoint import Checkpointer, PreemptionGuard, abstract_like  # noqa: E402


def make_state(step):
  return _make_state(step, 4)


stopped_at = None
with Checkpointer(DIRECTORY, save_every=1000, keep=2) as ckpt, PreemptionGuard() as guard:
  for step in range(1, 2000):
    if PROCESS_ID == 1 and step == 5:
      os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.01)
    if guard.should_stop(step):
      stopped_at = step
      assert ckpt.maybe_save(step, make_state(step), {"step": step}, force=True)
      break
  ckpt.wait()

with Checkpointer(DIRECTORY, save_every=1000, keep=2) as ckpt:
  step, state, extra = ckpt.restore_latest(abstract_like(make_state(0)))
local = np.concatenate([np.asarray(s.data) for s in state["w"].addressable_shards])
print(json.dumps({"process": PROCESS_ID, "stopped_at": stopped_at, "restored_step": step,
                  "extra": extra, "local_values": local.tolist()}))
