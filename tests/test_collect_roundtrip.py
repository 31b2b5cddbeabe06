"""End to end: generate (CLI, HF policy) -> annotate over HTTP -> stats and export (CLI) ->
a reward-model run on the exported file (CLI) -> that reward model labels the rest of the
queue. And: an SFT checkpoint of ours as the policy, and the gold labeller (exact and noisy).
"""
import json
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from conftest import REPO_ROOT, experiment_config, run_python
from rlhf_jax import configs, data, models, parallel
from rlhf_jax.collect import checkpoints, generate, label, report
from rlhf_jax.collect import db as db_lib
from rlhf_jax.train import checkpoint as ckpt_lib
from rlhf_jax.train import state as state_lib
from rlhf_jax.train import task as task_lib
from test_collect_support import Client, make_round, rows, running_server

TINY = dict(d_model=32, n_layers=1, n_heads=2, mlp_dim=64, max_len=64)


@pytest.fixture(scope="module")
def hf_policy(tmp_path_factory):
  """A random-init policy over the review world's vocabulary, as a local HF directory."""
  world = data.ReviewWorld()
  cfg = models.get_config("tiny", vocab_size=world.vocab_size, **TINY)
  module = models.build_model(cfg)
  ids = np.ones((1, 4), np.int32)
  params = parallel.init_params(module, jax.random.key(0), ids, ids)
  path = tmp_path_factory.mktemp("hf_policy")
  models.save_hf(module, params, path)
  world.tokenizer.save(str(path / "tokenizer.json"))
  return path


def _collect(*args):
  return run_python(["-m", "rlhf_jax.collect", *map(str, args)])


def test_generate_annotate_export_train_reward_model_and_label(hf_policy, tmp_path):
  # GENERATE: 6 prompts from a text file x 3 samples from the HF policy, through the CLI.
  prompts_file = tmp_path / "prompts.txt"
  prompts_file.write_text("\n".join(data.ReviewWorld().sample_prompts(6, seed=9)) + "\n\n")
  round_dir = tmp_path / "round"
  out = _collect("generate",
                 "--config=experiments/collect/review_world.py:runlocal,policy=hf,prompts=file",
                 f"--config.policy.path={hf_policy}", f"--config.prompts.path={prompts_file}",
                 "--config.sampling.max_new_tokens=12", f"--workdir={round_dir}")
  summary = json.loads(out.strip().splitlines()[-1])
  db_path = round_dir / "collect.db"
  assert summary["prompts"] == 6 and summary["responses"] == 18
  n_items = summary["items"]
  assert n_items == len(rows(db_path, "SELECT id FROM items")) >= 10
  assert summary["repeat_items"] == round(0.1 * n_items)
  assert (round_dir / "tokenizer.json").exists() and (round_dir / "config.json").exists()
  meta = db_lib.get_meta(db_lib.connect(db_path))
  # Neither the prompts nor the HF policy come from the review world: no gold reward.
  assert meta["world_seed"] is None and meta["config"]["k"] == 3
  assert rows(db_path, "SELECT source FROM prompts ORDER BY id")[0][0] == f"{prompts_file}:1"

  # ANNOTATE over HTTP: two people; the longer response wins, equal lengths tie; the first
  # comparison is skipped. They stop after 8, leaving the rest to a reward model.
  judged = []
  with running_server(db_path) as httpd:
    client = Client(httpd)
    for i in range(8):
      name = ("ann1", "ann2")[i % 2]
      a = client.next(name)
      la, lb = len(a["A"]["text"].split()), len(a["B"]["text"].split())
      choice = "skip" if i == 0 else "tie" if la == lb else "A" if la > lb else "B"
      status, body = client.submit(a, name, choice)
      assert status == 201, body
      judged.append(choice)
    client.close()

  # STATS and EXPORT through the CLI.
  text = _collect("stats", f"--db={db_path}")
  assert "Cohen's kappa" in text and "position bias" in text
  stats = json.loads(_collect("stats", f"--workdir={round_dir}", "--json"))
  assert stats["judgments"] == 8 and stats["skips"] == 1
  prefs = round_dir / "prefs.jsonl"
  out = _collect("export", f"--db={db_path}", f"--out={prefs}")
  counts = json.loads(out.strip().splitlines()[-1])
  n_pairs = sum(c in ("A", "B") for c in judged)
  assert counts["pairs"] == n_pairs and counts["skips"] == 1
  assert counts["ties"] == judged.count("tie")
  pairs = data.read_preferences(str(prefs))
  assert len(pairs) == n_pairs
  for p in pairs:  # The rule the annotators followed, seen through left/right randomisation.
    assert len(p.chosen.split()) > len(p.rejected.split())

  # A REWARD MODEL on the exported file: the reward stage through the CLI.
  rm_dir = tmp_path / "rm"
  run_python(["-m", "rlhf_jax.main", "--config=experiments/collect/reward_from_export.py:runlocal",
              f"--config.task.tokenizer={round_dir / 'tokenizer.json'}",
              f"--config.data.pairs={prefs}", f"--workdir={rm_dir}"])
  results = json.loads((rm_dir / "reward" / "reward_results.json").read_text())
  # 10% of the pairs (at least one) held out for evaluation, the rest trained on.
  assert results["eval_pairs"] == max(1, round(0.1 * n_pairs))
  assert results["train_pairs"] + results["eval_pairs"] == n_pairs
  last = json.loads((rm_dir / "reward" / "metrics.jsonl").read_text().splitlines()[-1])
  assert last["step"] == 5 and np.isfinite(last["loss"])

  # The reward model labels what the people left: every target met afterwards.
  out = _collect("label", f"--db={db_path}", "--labeler=reward",
                 f"--reward_checkpoint={rm_dir / 'reward'}")
  labelled = json.loads(out.strip().splitlines()[-1])
  stats = json.loads(_collect("stats", f"--db={db_path}", "--json"))
  assert stats["judgments_needed"] == 0
  assert stats["by_labeler"]["reward"] == labelled["labelled"] > 0
  assert stats["by_labeler"]["human"] == 8


def test_prompt_files(tmp_path):
  txt = tmp_path / "p.txt"
  txt.write_text("first prompt\n\n  second prompt\nthird\n")
  assert generate.read_prompt_file(str(txt)) == [("first prompt", f"{txt}:1"),
                                                 ("  second prompt", f"{txt}:3"),
                                                 ("third", f"{txt}:4")]
  assert len(generate.read_prompt_file(str(txt), limit=2)) == 2
  jsonl = tmp_path / "p.jsonl"
  jsonl.write_text('{"prompt": "a b"}\n{"prompt": "c"}\n')
  assert [t for t, _ in generate.read_prompt_file(str(jsonl))] == ["a b", "c"]
  jsonl.write_text('{"prompt": "a b"}\n{"text": "c"}\n')
  with pytest.raises(data.DataError, match=r"p.jsonl:2: expected an object with a string"):
    generate.read_prompt_file(str(jsonl))
  jsonl.write_text('{"prompt": "a b"}\n{"prompt": \n')
  with pytest.raises(data.DataError, match=r"p.jsonl:2: malformed JSON"):
    generate.read_prompt_file(str(jsonl))
  (tmp_path / "empty.txt").write_text("\n\n")
  with pytest.raises(data.DataError, match="no prompts"):
    generate.read_prompt_file(str(tmp_path / "empty.txt"))
  with pytest.raises(FileNotFoundError, match="no such prompt file"):
    generate.read_prompt_file(str(tmp_path / "missing.txt"))


def test_cli_errors_are_one_clear_line(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "rlhf_jax.collect", "stats",
                         f"--db={tmp_path / 'nope.db'}"], cwd=REPO_ROOT, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 1
  assert "no such collection database" in proc.stderr.splitlines()[-1]
  proc = subprocess.run([sys.executable, "-m", "rlhf_jax.collect", "annotate"], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and "expected one command" in proc.stderr
  make_round(tmp_path / "synthetic.db")  # Not from the review world: no gold reward.
  proc = subprocess.run([sys.executable, "-m", "rlhf_jax.collect", "label", "--labeler=gold",
                         f"--db={tmp_path / 'synthetic.db'}"], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and "has no gold reward" in proc.stderr


def test_sft_checkpoint_policy_and_gold_labels(tmp_path):
  # An SFT checkpoint exactly as our loop writes it: state {params, opt, step, rng} plus the
  # run's config in `extra`.
  sft_config = experiment_config("quickstart/config.py", tiny=False)
  sft_config.model.update(TINY)
  task = task_lib.build_task(sft_config)
  module = models.build_model(configs.model_config(sft_config.model, task.vocab_size))
  mesh = parallel.make_mesh({"data": -1})
  ids = np.ones((1, 4), np.int32)
  params = parallel.init_params(module, jax.random.key(3), ids, ids, mesh=mesh)
  state = state_lib.state_from_params(params, optax.adamw(1e-3), jax.random.key(4), mesh,
                                      "fsdp")
  with ckpt_lib.Checkpointer(tmp_path / "sft" / "checkpoints", save_every=1, keep=1) as ckpt:
    ckpt.maybe_save(7, state, {"config": sft_config.to_dict(), "data_position": 0}, force=True)
  restored = checkpoints.restore(tmp_path / "sft", role="policy", mesh=mesh, rules="fsdp")
  assert restored.step == 7 and restored.config.task.kind == "review_world"
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               restored.params, params)

  config = experiment_config("collect/review_world.py", tiny=False)
  config.policy.path = str(tmp_path / "sft")
  config.sampling.max_new_tokens = 8
  summary = generate.run_generate(config, str(tmp_path / "round"))
  assert summary["world_seed"] == 0 and summary["policy"].endswith("step 7")
  with pytest.raises(FileExistsError, match="fresh workdir"):
    generate.run_generate(config, str(tmp_path / "round"))

  # GOLD, temperature 0: the higher gold reward wins every judgment; re-annotations agree.
  db_path = tmp_path / "round" / "collect.db"
  conn = db_lib.connect(db_path)
  counts = label.label_queue(conn, label.gold_scorer(0), labeler="gold", annotator="gold")
  s = report.collection_stats(conn)
  assert counts["labelled"] == s["items"] + s["items_for_reannotation"]
  assert s["judgments_needed"] == 0 and s["agreement"]["agreement_rate"] == 1.0
  assert set(s["by_annotator"]) == ({"gold", "gold-2"} if s["items_for_reannotation"]
                                    else {"gold"})
  assert label.label_queue(conn, label.gold_scorer(0), labeler="gold",
                           annotator="gold")["labelled"] == 0  # Nothing left to label.
  world = data.ReviewWorld()
  finished = {r["id"]: bool(r["finished"]) for r in rows(db_path, "SELECT * FROM responses")}
  for j in rows(db_path, """
      SELECT j.winner_response, j.choice, i.response_a, i.response_b, p.text AS prompt,
             ra.text AS ta, rb.text AS tb
      FROM judgments j JOIN items i ON i.id = j.item_id JOIN prompts p ON p.id = i.prompt_id
      JOIN responses ra ON ra.id = i.response_a JOIN responses rb ON rb.id = i.response_b"""):
    ra = world.score([j["prompt"]], [j["ta"]], ended=finished[j["response_a"]]).reward[0]
    rb = world.score([j["prompt"]], [j["tb"]], ended=finished[j["response_b"]]).reward[0]
    expected = None if ra == rb else (j["response_a"] if ra > rb else j["response_b"])
    assert j["winner_response"] == expected
  conn.close()


def test_gold_labels_with_bradley_terry_noise(tmp_path):
  db_path = tmp_path / "collect.db"
  make_round(db_path, n_prompts=8, k=3, seed=5, review_world=True)  # 24 items, 6 repeats.
  conn = db_lib.connect(db_path)
  clean_db = tmp_path / "clean.db"
  make_round(clean_db, n_prompts=8, k=3, seed=5, review_world=True)
  clean = db_lib.connect(clean_db)
  label.label_queue(clean, label.gold_scorer(0), labeler="gold", annotator="gold")
  label.label_queue(conn, label.gold_scorer(0), labeler="gold", annotator="gold",
                    temperature=1e3, seed=1)  # Far above reward gaps: near coin flips.
  winners = lambda c: {(r[0], r[1]) for r in c.execute(
      "SELECT item_id, winner_response FROM judgments WHERE annotator = 'gold'")}
  flipped = len(winners(clean) - winners(conn))
  assert 3 <= flipped <= 21, flipped
  # The same seed redraws the same labels.
  again = tmp_path / "again.db"
  make_round(again, n_prompts=8, k=3, seed=5, review_world=True)
  conn2 = db_lib.connect(again)
  label.label_queue(conn2, label.gold_scorer(0), labeler="gold", annotator="gold",
                    temperature=1e3, seed=1)
  assert winners(conn2) == winners(conn)
  for c in (conn, clean, conn2):
    c.close()
