"""One process of a multi-host CPU job, or the single-process reference (tests/test_multihost.py):

  multihost_worker.py PROCESS_ID NUM_PROCESSES PORT WORKDIR

8 simulated CPU devices in all (8 / NUM_PROCESSES per process) on a data 2 x fsdp 4 mesh; with
2 processes the mesh is pod-shaped (dcn data = 2: each process stands in for a slice). Runs 5
DPO steps (checkpointed at 3 and 5, then resumed from step 5), evaluates the policy (sampling,
gold reward, KL), then 1 PPO iteration on the gold reward with the held-out SFT perplexity, then
3 KTO steps from the PPO policy against the DPO policy.
Process 0 joins through config.distributed, process 1 through $RLHF_JAX_COORDINATOR. With 2
processes it also checks the pod mesh's layout. Prints one JSON line.
"""
import dataclasses
import json
import os
import sys

PROCESS_ID, NUM_PROCESSES, PORT, WORKDIR = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
                                           sys.argv[4])

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8 // NUM_PROCESSES)
if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

from rlhf_jax import configs  # noqa: E402
from rlhf_jax.parallel import distributed  # noqa: E402

DIST = {"enabled": False, "coordinator_address": "", "num_processes": 1, "process_id": 0,
        "initialization_timeout": 60}
if NUM_PROCESSES > 1 and PROCESS_ID == 0:
  DIST.update(coordinator_address=f"127.0.0.1:{PORT}", num_processes=NUM_PROCESSES)
elif NUM_PROCESSES > 1:
  os.environ.update({distributed.ENV_COORDINATOR: f"127.0.0.1:{PORT}",
                     distributed.ENV_NUM_PROCESSES: str(NUM_PROCESSES),
                     distributed.ENV_PROCESS_ID: str(PROCESS_ID)})
multi = distributed.initialize(DIST)
assert multi == (NUM_PROCESSES > 1) and jax.process_count() == NUM_PROCESSES
assert jax.process_index() == PROCESS_ID and jax.device_count() == 8

import numpy as np  # noqa: E402

from rlhf_jax import eval as eval_lib  # noqa: E402
from rlhf_jax import parallel, rng  # noqa: E402
from rlhf_jax.train import pipeline, preference, rl  # noqa: E402


def make_config():
  c = pipeline.review_world_config(runlocal=True)
  c.model.update(d_model=32, n_layers=1, n_heads=4, mlp_dim=64)
  c.mesh.update(data=2, fsdp=4, tensor=1)
  c.mesh.dcn.data = NUM_PROCESSES
  c.task.update(n_sft=64, n_eval=16, n_pairs=64, n_eval_pairs=16)
  c.run.update(log_every=1, checkpoint_every=3)
  c.dpo.update(steps=5, batch_size=8, eval_every=5)
  c.ppo.update(iterations=1, train_prompts=32, prompts_per_iter=16, minibatch_size=8, epochs=1,
               max_new_tokens=8, reward_source="gold", eval_every=1)
  c.sampling.max_new_tokens = 8
  c.eval.update(prompts=8, k=1)
  return configs.lock(c)


def read_metrics(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def checksum(tree):
  leaves = parallel.distributed.gather(jax.tree.leaves(tree))
  return [float(np.sum(np.asarray(x, np.float64))) for x in leaves]


def pod_mesh_report():
  """Where each mesh position lives, which rows this process feeds, and the errors for
  layouts that would split tensor groups across processes."""
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2, "dcn": {"data": 2}})
  procs = np.vectorize(lambda d: d.process_index)(mesh.devices)
  errors = {}
  for name, spec in (("dcn_tensor", {"data": 1, "fsdp": 4, "tensor": 2,
                                     "dcn": {"tensor": 2}}),
                     ("tensor_across", {"data": 1, "fsdp": 1, "tensor": 8})):
    try:
      parallel.make_mesh(spec)
      errors[name] = None
    except ValueError as e:
      errors[name] = str(e)
  rows = parallel.distributed.local_rows(parallel.batch_sharding(mesh, 1), 8)
  return {"process_of_position": procs.tolist(), "local_rows": [rows.start, rows.stop],
          "errors": errors}


def main():
  config = make_config()
  out = {"process": PROCESS_ID, "process_seed": distributed.process_seed(0)}
  if NUM_PROCESSES > 1:
    out["pod_mesh"] = pod_mesh_report()
  dpo_dir = os.path.join(WORKDIR, "dpo")
  dpo = preference.run(config, dpo_dir)
  module, params, task = dpo.module, dpo.params, dpo.task
  out["dpo_results"] = dpo.metrics
  out["dpo_params"] = checksum(params)
  out["dpo_checkpoints"] = sorted(int(s) for s in os.listdir(os.path.join(dpo_dir, "checkpoints"))
                                  if s.isdigit())
  # Resume: the finished run restores step 5 on every process and trains no further.
  again = preference.run(config, dpo_dir)
  resumed = again.params
  out["resumed_params"] = checksum(resumed)
  out["resumed_results"] = again.metrics

  mesh = parallel.make_mesh(config.mesh.to_dict())
  prompts = task.world.sample_prompts(config.eval.prompts, seed=rng.prompt_seed("heldout"))
  out["eval"] = eval_lib.evaluate_policy(
      module, params, prompts, world=task.world, cfg=config.sampling, tok=task.tokenize_config,
      mesh=mesh, rules=config.sharding, key=jax.random.key(4), ref_params=resumed, k=1)

  ppo_dir = os.path.join(WORKDIR, "ppo")
  ppo_params = rl.run(config, ppo_dir, dpo).params
  out["ppo_params"] = checksum(ppo_params)

  # KTO: the batch-KL rows pair each example with the next example of the data stream (built
  # in the step from the global batch), so 2 processes must match 1 here too. The KL estimate z0 = max(0, mean log-ratio of
  # those rows) only matters when it is positive, so the run starts from the PPO policy against
  # the DPO policy as reference (a reference equal to the start gives z0 = 0 at first).
  kto_config = make_config().unlock()
  kto_config.dpo.update(loss="kto", reference="model", shared_prefix=False, steps=3,
                        eval_every=3)
  start = dataclasses.replace(dpo, params=ppo_params)
  kto = preference.run(configs.lock(kto_config), os.path.join(WORKDIR, "kto"), start,
                       reference=params)
  out["kto_params"] = checksum(kto.params)
  out["kto_results"] = kto.metrics
  if distributed.is_main_process():
    out["dpo_metrics"] = read_metrics(os.path.join(dpo_dir, "metrics.jsonl"))
    out["ppo_metrics"] = read_metrics(os.path.join(ppo_dir, "metrics.jsonl"))
    out["kto_metrics"] = read_metrics(os.path.join(WORKDIR, "kto", "metrics.jsonl"))
  else:  # Only process 0 writes metrics and logs.
    out["wrote_metrics"] = os.path.exists(os.path.join(WORKDIR, "dpo", "metrics.jsonl"))
  print(json.dumps(out), flush=True)


if __name__ == "__main__":
  main()
