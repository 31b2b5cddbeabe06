"""What the experiment drivers share: the review world's front (SFT, pairs, reward model) with a
held-out evaluator; publishing a table, a plot and results.json; phases cached as JSON so a
rerun skips them; figures drawn without pyplot."""
import json
import os

import jax
import ml_collections
from absl import logging

from rlhf_jax import eval as eval_lib
from rlhf_jax import rng
from rlhf_jax.train import pipeline


def front(config: ml_collections.ConfigDict, workdir: str):
  """(pipeline result of config.stages, e.g. SFT -> pairs -> reward model, in workdir; params ->
  gold reward and KL to the SFT policy on the held-out prompts, with fixed sampling keys). The
  pipeline's summary goes to pipeline.json: results.json is the driver's."""
  out = pipeline.run(config, workdir, evaluate=False, summary_name="pipeline.json")
  sft = out.stages["sft"]
  prompts = sft.task.world.sample_prompts(config.eval.prompts, seed=rng.prompt_seed("heldout"))
  return out, eval_lib.make_policy_evaluator(config, sft.task, sft.mesh, sft.module, sft.params,
                                             prompts=prompts)


def publish(workdir: str, results: dict, table: str, plot, plot_name: str) -> dict:
  """Prints the table; process 0 writes the plot, results.md and results.json."""
  print(table, flush=True)
  if jax.process_index() == 0:
    plot(results, os.path.join(workdir, plot_name))
    write(workdir, "results.md", table)
    write(workdir, "results.json", json.dumps(results, indent=1))
  return results


def cached(path: str, compute):
  """compute() once: its JSON result is kept at `path` and read back on later runs (delete the
  file to redo the phase)."""
  if os.path.exists(path):
    logging.info("reusing %s", path)
    with open(path) as f:
      return json.load(f)
  out = compute()
  if jax.process_index() == 0:
    with open(path + ".tmp", "w") as f:
      json.dump(out, f, indent=1)
    os.replace(path + ".tmp", path)
  return out


def with_ppo(config: ml_collections.ConfigDict, **ppo) -> ml_collections.ConfigDict:
  """A copy of config with config.ppo fields replaced (the original stays untouched)."""
  c = config.copy_and_resolve_references()
  c.ppo.update(ppo)
  return c


def figure(*shape, size):
  """A matplotlib Figure on an Agg canvas, without pyplot (no global backend is touched)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=size, layout="constrained")
  FigureCanvasAgg(fig)
  return fig, fig.subplots(*shape, squeeze=False)


def write(workdir: str, name: str, text: str) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(workdir, name), "w") as f:
      f.write(text)


def pm(x, se, digits=3) -> str:
  return f"{x:.{digits}f} ± {se:.{digits}f}"
