"""The arithmetic world: determinism, exact answers, the tokenizer, SFT targets that grade as
correct, the held-out split, the task wiring, and a short SFT -> GRPO run on a grader."""
import json

import numpy as np
import pytest

from conftest import TINY_MODEL, experiment_config, run_python
from rlhf_jax import data
from rlhf_jax.data import arithmetic_world as aw
from rlhf_jax.train import pipeline, reward
from rlhf_jax.train import task as task_lib


@pytest.fixture(scope="module")
def world():
  return aw.ArithmeticWorld()


def test_deterministic_from_seed():
  a, b, c = (aw.ArithmeticWorld(aw.WorldConfig(seed=s)) for s in (1, 1, 2))
  assert a.sample_sft(300, seed=0) == b.sample_sft(300, seed=0)
  assert a.sample_prompts(300, seed=5) == b.sample_prompts(300, seed=5)
  assert a.sample_sft(300, seed=0) != a.sample_sft(300, seed=1)  # The data seed matters,
  assert a.sample_sft(300, seed=0) != c.sample_sft(300, seed=0)  # and so does the world's.
  assert a.vocab == c.vocab and a.tokenizer.get_vocab() == c.tokenizer.get_vocab()


def test_exact_answers_match_python(world):
  """Every sampled problem's answer and worked steps agree with Python's own evaluation (the
  same precedence: * before + and -, left to right)."""
  problems = world.sample_prompts(500, seed=3) + [e.prompt for e in world.sample_sft(500)]
  hard = aw.ArithmeticWorld(aw.WorldConfig(max_operands=5, max_operand=99))
  problems += hard.sample_prompts(300, seed=4)
  for p in problems:
    assert p.endswith("=")
    expected = eval(p[:-1])  # noqa: S307 (digits and + - * only, generated here)
    assert aw.answer(p) == expected, p
    response = aw.worked_answer(p)
    assert response.endswith(f"#### {expected}") and aw.final_answer(response) == expected
    for step in response.split(" #### ")[0].split(" "):  # Each step is itself true.
      lhs, rhs = step.rsplit("=", 1)
      assert eval(lhs) == int(rhs), (p, step)  # noqa: S307
  ops = {len(p) - len(p.replace("+", "").replace("-", "").replace("*", "")) for p in problems}
  assert {1, 2} <= ops  # Two and three operands at the defaults.
  assert aw.worked_answer("12+7*3=") == "7*3=21 12+21=33 #### 33"
  assert aw.worked_answer("3-9+2=") == "3-9=-6 -6+2=-4 #### -4"


def test_tokenizer_round_trip(world, tmp_path):
  assert (world.pad_id, world.eos_id) == (0, 1) and world.vocab_size == 19
  text = "8*6=48 48-6=42 #### 42"
  ids = world.tokenizer.encode(text, add_special_tokens=False).ids
  assert ids == world.encode(text).tolist() and len(ids) == len(text)
  assert world.decode(ids + [world.eos_id, 5, 0]) == text
  assert world.tokenizer.decode(ids) == text  # Characters joined back without spaces.
  world.tokenizer.save(str(tmp_path / "tokenizer.json"))
  assert data.load_tokenizer(tmp_path).encode(text).ids == ids
  assert world.decode(world.encode("1+x")) == "1+[UNK]"


def test_sft_targets_grade_as_correct_and_fit(world):
  sft = world.sample_sft(1000, seed=2)
  assert all(aw.grade(e.prompt, e.response) == 1.0 and aw.formatted(e.response) for e in sft)
  res = data.tokenize_sft(sft, world.tokenizer, world.tokenize_config())
  assert len(res.examples) == 1000 and res.truncated_prompts == res.truncated_responses == 0
  ids = [world.encode(e.prompt) for e in sft[:50]]
  with_eos = [np.append(world.encode(e.response), [world.eos_id, 0, 0]) for e in sft[:50]]
  gold = world.score_ids(ids, with_eos)
  assert gold.reward.tolist() == [1.0] * 50 and gold.formatted.all()
  # Cut off before EOS: not finished, no reward.
  assert world.score_ids(ids, [world.encode(e.response) for e in sft[:50]]).reward.sum() == 0
  wrong = world.score([sft[0].prompt], [sft[0].response.replace("####", "###")])
  assert wrong.reward.tolist() == [0.0] and wrong.formatted.tolist() == [0.0]


def test_format_weight():
  world = aw.ArithmeticWorld(aw.WorldConfig(format_weight=0.25))
  s = world.score(["2*3="] * 3, ["2*3=6 #### 6", "2*3=7 #### 7", "#### 6"])
  assert s.reward.tolist() == [1.25, 0.25, 1.0]  # A bare "#### 6" is right but not formatted.


def test_heldout_problems_are_reserved(world):
  heldout = set(world.sample_prompts(300, seed=aw.HELDOUT_SEED))
  assert all(world.is_heldout(p) for p in heldout)
  seen = {e.prompt for e in world.sample_sft(5000)} | set(world.sample_prompts(2000, seed=20))
  assert not heldout & seen and not any(world.is_heldout(p) for p in seen)
  frac = np.mean([world.is_heldout(p) for p in world._problems(np.random.default_rng(0), 3000,
                                                                False)])
  assert frac == 0.0


def test_world_config_errors_name_the_key():
  with pytest.raises(ValueError, match="max_operands=1: must be >= min_operands=2"):
    aw.WorldConfig(max_operands=1)
  with pytest.raises(ValueError, match=r"ops='\+/': a non-empty string of distinct operators"):
    aw.WorldConfig(ops="+/")
  config = experiment_config("arithmetic/config.py")
  config.task.max_operand = 0
  with pytest.raises(ValueError, match="config.task.max_operand=0: must be an integer >= 1"):
    task_lib.validate(config)
  config.task.max_operand, config.task.n_sft = 9, 0
  with pytest.raises(ValueError, match="config.task.n_sft=0"):
    task_lib.validate(config)
  config.task.n_sft, config.task.kind = 10, "arithmetic"
  with pytest.raises(ValueError, match="config.task.kind='arithmetic'; expected one of"):
    task_lib.validate(config)


def test_task_and_pipeline_wiring():
  config = experiment_config("arithmetic/config.py")
  pipeline.validate(config)
  task = task_lib.build_task(config)
  assert isinstance(task.world, aw.ArithmeticWorld) and task.vocab_size == 19
  assert task.tokenizer_files.special["eos_token"] == aw.EOS
  config.task.n_sft, config.task.n_eval = 40, 10
  train = task_lib.sft_examples(task, config, "train")
  assert len(train) == 40 and all(e.response[-1] == task.world.eos_id for e in train)
  prompts = task_lib.prompts(task, config, "train", n=16)
  assert len(prompts) == 16 and task.decode(prompts[0]).endswith("=")
  config.stages = ("sft", "reward", "ppo")
  config.reward = reward.default_config()
  with pytest.raises(ValueError, match="'reward' trains on preference pairs, which config.task."
                     "kind='arithmetic_world' does not have"):
    pipeline.validate(config)


def test_sft_then_grpo_on_a_grader(tmp_path):
  """SFT -> GRPO through rlhf_jax.main with reward_source="grader" (the world's grader named as
  "module:function"), a tiny model and two iterations: the run completes, logs the grader's
  reward beside the gold one, and evaluates both policies on held-out problems."""
  model = [f"--config.model.{k}={v}" for k, v in TINY_MODEL.items()]
  run_python(["-m", "rlhf_jax.main", "--config=experiments/arithmetic/config.py:runlocal,"
              "reward=grader", f"--workdir={tmp_path}", *model, "--config.sft.steps=8",
              "--config.sft.eval_every=0", "--config.task.n_sft=200", "--config.task.n_eval=20",
              "--config.ppo.iterations=2", "--config.ppo.prompts_per_iter=4",
              "--config.ppo.group_size=4", "--config.ppo.minibatch_size=16",
              "--config.ppo.max_new_tokens=24", "--config.ppo.eval_every=0",
              "--config.sampling.max_new_tokens=24", "--config.sampling.batch_size=16",
              "--config.eval.prompts=8",
              "--config.export.enabled=False"])
  results = json.loads((tmp_path / "results.json").read_text())
  evaluation = results["evaluation"]
  assert set(evaluation) == {"sft", "grpo"} and evaluation["grpo"]["samples"] == 16
  assert 0.0 <= evaluation["grpo"]["gold_reward"] <= 1.0 and "kl" in evaluation["grpo"]
  logged = [json.loads(l) for l in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in logged] == [1, 2]
  for m in logged:
    assert 0.0 <= m["grader_reward"] <= 1.0 and 0.0 <= m["gold_reward"] <= 1.0
