"""Verifiable rewards: graders named in the config, GSM8K-style answer extraction, the arithmetic
world's grader, prompts files with reference answers, and the RL stage's checks of a grader."""
import json
import textwrap

import numpy as np
import pytest

from conftest import experiment_config
from rlhf_jax import data, graders
from rlhf_jax.data import arithmetic_world as aw
from rlhf_jax.train import grading, rl
from rlhf_jax.train import task as task_lib


@pytest.fixture
def user_module(tmp_path, monkeypatch):
  """A user's own grader module on sys.path (mypkg_graders_test:score etc.)."""
  (tmp_path / "mypkg_graders_test.py").write_text(textwrap.dedent("""
      NOT_A_FUNCTION = 3

      def score(prompt, response):
          return float(response.strip() == "yes")

      def one_arg(response):
          return 1.0

      def with_reference(prompt, response, reference):
          return float(response == reference)

      def returns_text(prompt, response):
          return "good"

      def returns_nan(prompt, response):
          return float("nan")

      def raises(prompt, response):
          raise KeyError("boom")
  """))
  (tmp_path / "mypkg_broken_test.py").write_text("import no_such_dependency_xyz\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  return "mypkg_graders_test"


# ---------------------------------------------------------------------------------------------
# load_grader
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, match", [
    ("", "expected 'module:function'"),
    ("rlhf_jax.graders.gsm8k_exact", "expected 'module:function'"),
    ("a:b:c", "expected 'module:function'"),
    (":gsm8k_exact", "expected 'module:function'"),
    ("rlhf_jax.graders:", "expected 'module:function'"),
    (None, "expected 'module:function'"),
    ("no_such_module_xyz:score", "module 'no_such_module_xyz' is not importable"),
    ("rlhf_jax.graders:no_such_grader", "has no attribute 'no_such_grader'"),
    ("rlhf_jax.graders:_PROGRESS_MIN_ROWS", "is a int, not callable"),
])
def test_load_grader_errors_name_the_config_key(spec, match):
  with pytest.raises(ValueError, match=match) as err:
    graders.load_grader(spec, "config.ppo.grader")
  assert str(err.value).startswith(f"config.ppo.grader={spec!r}")


def test_load_grader_user_module(user_module):
  g = graders.load_grader(f"{user_module}:score")
  assert (g.wants_reference, g.needs_reference) == (False, False)
  assert g("q", " yes ") == 1.0 and g("q", "no") == 0.0
  ref = graders.load_grader(f"{user_module}:with_reference", "config.online_dpo.grader")
  assert (ref.wants_reference, ref.needs_reference) == (True, True)
  with pytest.raises(ValueError, match=r"config.ppo.grader=.*one_arg.*called as fn\(prompt, "
                     "response\\)"):
    graders.load_grader(f"{user_module}:one_arg")
  with pytest.raises(ValueError, match="config.ppo.grader=.*importing module "
                     "'mypkg_broken_test' failed.*no_such_dependency_xyz"):
    graders.load_grader("mypkg_broken_test:score")
  with pytest.raises(ValueError, match="not callable"):
    graders.load_grader(f"{user_module}:NOT_A_FUNCTION")


def test_score_responses(user_module):
  g = graders.load_grader(f"{user_module}:score")
  out = graders.score_responses(g, ["a", "b", "c"], ["yes", "no", "yes"])
  assert out.dtype == np.float32 and out.tolist() == [1.0, 0.0, 1.0]
  assert graders.score_responses(lambda p, r: r == "x", ["p"], ["x"]).tolist() == [1.0]
  for name, match in (("returns_text", "returned 'good' \\(str\\) on row 0"),
                      ("returns_nan", "returned nan \\(float\\) on row 0")):
    with pytest.raises(ValueError, match=f"config.ppo.grader='{user_module}:{name}' {match}"):
      graders.score_responses(graders.load_grader(f"{user_module}:{name}"), ["a", "b"],
                              ["x", "y"])
  with pytest.raises(RuntimeError, match="config.ppo.grader=.*raised KeyError on row 0"):
    graders.score_responses(graders.load_grader(f"{user_module}:raises"), ["a"], ["x"])
  ref = graders.load_grader(f"{user_module}:with_reference")
  assert graders.score_responses(ref, ["a", "b"], ["1", "2"], ["1", "3"]).tolist() == [1, 0]
  with pytest.raises(ValueError, match="requires a reference answer.*prompt 'b' \\(row 1\\)"):
    graders.score_responses(ref, ["a", "b"], ["1", "2"], ["1", None])
  with pytest.raises(ValueError, match="requires a reference answer"):
    graders.score_responses(ref, ["a"], ["1"])


# ---------------------------------------------------------------------------------------------
# Answer extraction
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    # GSM8K: the "####" marker wins over every other number.
    ("Natalia sold 48/2 = 24 clips in May.\nAltogether 48+24 = 72 clips.\n#### 72", "72"),
    ("The answer is 5.\n#### 1,234", "1234"),
    ("#### -7", "-7"),
    ("#### $18.50.", "18.50"),
    ("first #### 3 then #### 4", "4"),
    ("#### none", None),  # A marker followed by no number: the declared answer is not one.
    # MATH: the last \boxed{}.
    ("so x = \\boxed{\\frac{3}{4}}", "3/4"),
    ("\\boxed{1} or rather \\boxed{1,000}", "1000"),
    ("\\boxed{\\text{(B)}}", None),
    # "the answer is" / "answer:".
    ("I think the answer is 12, not 13 or 14.", "12"),
    ("Final answer: -3.5", "-3.5"),
    # The last number.
    ("3 apples and 4 pears make 7", "7"),
    ("it costs $1,000,000 in total", "1000000"),
    ("5-3=2", "2"),
    ("the result is -5", "-5"),
    ("half is .5", ".5"),
    ("no digits here", None),
    ("", None),
])
def test_extract_answer(text, expected):
  assert graders.extract_answer(text) == expected


@pytest.mark.parametrize("a, b, equal", [
    ("42", "42.0", True), ("1,000", "1000", True), ("3/4", "0.75", True),
    ("-5", "-5.00", True), ("$7", "7", True), ("0.3333333", "1/3", True), ("1e3", "1000", True),
    ("42", "43", False), ("0.5", "1/3", False), ("-5", "5", False), (None, "1", False),
    (None, None, False), ("x+1", "X+1", True), ("abc", "abd", False),
])
def test_answers_equal(a, b, equal):
  assert graders.answers_equal(a, b) is equal
  assert graders.answers_equal(b, a) is equal


def test_gsm8k_exact():
  solution = ("Weng earns 12/60 = $0.2 per minute.\nWorking 50 minutes, she earned "
              "0.2 x 50 = $10.\n#### 10")
  assert graders.gsm8k_exact("q", "She earned $10.00. #### 10", reference=solution) == 1.0
  assert graders.gsm8k_exact("q", "so the answer is 10", reference="10") == 1.0
  assert graders.gsm8k_exact("q", "#### 11", reference=solution) == 0.0
  assert graders.gsm8k_exact("q", "I do not know", reference="10") == 0.0
  with pytest.raises(ValueError, match="holds no answer"):
    graders.gsm8k_exact("q", "#### 10", reference="unknown")
  g = graders.load_grader("rlhf_jax.graders:gsm8k_exact")
  assert g.needs_reference
  assert graders.has_final_answer("q", "... #### 3") == 1.0
  assert graders.has_final_answer("q", "3") == 0.0


# ---------------------------------------------------------------------------------------------
# The arithmetic world's grader
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt, response, score", [
    ("12+7*3=", "7*3=21 12+21=33 #### 33", 1.0),  # Right.
    ("12+7*3=", "7*3=21 12+21=34 #### 34", 0.0),  # Wrong.
    ("12+7*3=", "7*3=21 12+21=33", 0.0),  # Missing marker: no final answer.
    ("12+7*3=", "33", 0.0),
    ("12+7*3=", "7*3=21 12+21=33 #### 33 because", 0.0),  # Extra text after the answer.
    ("12+7*3=", "#### 33 ", 1.0),  # Trailing spaces are fine, steps are not verified.
    ("12+7*3=", "12+7=19 19*3=57 #### 33", 1.0),  # Wrong steps, right final answer.
    ("3-9=", "3-9=-6 #### -6", 1.0),  # Negative answers.
    ("3-9=", "3-9=-6 #### 6", 0.0),
    ("2*3*4=", "2*3=6 6*4=24 ####24", 1.0),
])
def test_arithmetic_grade(prompt, response, score):
  assert aw.grade(prompt, response) == score
  assert graders.load_grader("rlhf_jax.data.arithmetic_world:grade")(prompt, response) == score


def test_arithmetic_grade_rejects_other_prompts():
  with pytest.raises(ValueError, match="not an arithmetic_world prompt"):
    aw.grade("what is 2+2?", "#### 4")


def test_grading_decodes_rollouts_with_references():
  """grading.grade on the arithmetic world: token ids decoded, the world's reference answers
  given to a grader that takes one (gsm8k_exact), responses without EOS."""
  config = experiment_config("arithmetic/config.py", "runlocal,reward=grader")
  config.ppo.grader = "rlhf_jax.graders:gsm8k_exact"
  rl.validate(config)
  task = task_lib.build_task(config)
  world = task.world
  prompts = ["12+7*3=", "3-9=", "4*4="]
  responses = ["7*3=21 12+21=33 #### 33", "3-9=-6 #### 6", "the answer is 16"]
  ids = [world.encode(p) for p in prompts]
  got = grading.grade(task, config, ids, [world.encode(r) for r in responses])
  assert got.tolist() == [1.0, 0.0, 1.0]  # gsm8k_exact falls back to "the answer is".
  config.ppo.grader = "rlhf_jax.data.arithmetic_world:grade"
  got = grading.grade(task, config, ids, [world.encode(r) for r in responses])
  assert got.tolist() == [1.0, 0.0, 0.0]  # The world's own grader needs the marker.


# ---------------------------------------------------------------------------------------------
# Prompts files with reference answers
# ---------------------------------------------------------------------------------------------

def _write(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def test_read_prompt_answers(tmp_path):
  path = _write(tmp_path / "p.jsonl", [{"prompt": "1+1=", "answer": "2"},
                                       {"prompt": "2*3=", "answer": 6}])
  got = data.read_prompt_answers(path)
  assert [(r.prompt, r.answer) for r in got] == [("1+1=", "2"), ("2*3=", "6")]
  assert got[1].source == f"{path}:2"
  bad = _write(tmp_path / "bad.jsonl", [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2*3="}])
  with pytest.raises(data.DataError, match=f"{bad}:2: missing field 'answer'"):
    data.read_prompt_answers(bad)
  assert len(data.read_prompt_answers(bad, on_error="skip")) == 1
  with pytest.raises(data.DataError, match=f"{bad}:1: missing field 'solution'"):
    data.read_prompt_answers(bad, answer_field="solution")
  wrong = _write(tmp_path / "w.jsonl", [{"prompt": "1+1=", "answer": [2]}])
  with pytest.raises(data.DataError, match=f"{wrong}:1: field 'answer' must be a string or a "
                     "number, got list"):
    data.read_prompt_answers(wrong)
  txt = tmp_path / "p.txt"
  txt.write_text("1+1=\n")
  with pytest.raises(data.DataError, match="a .txt prompt file holds one prompt per line and no "
                     "reference answers"):
    data.read_prompt_answers(txt)


def _file_task(tmp_path, rows):
  """A file task whose tokenizer is the arithmetic world's (character level)."""
  world = aw.ArithmeticWorld()
  task = task_lib.Task(world.tokenizer, world.tokenize_config(), world.vocab_size)
  config = experiment_config("arithmetic/config.py", "runlocal,reward=grader")
  config.task, config.data = task_lib.files_config()
  config.data.prompts = _write(tmp_path / "prompts.jsonl", rows)
  return task, config


def test_file_prompts_reference_answers(tmp_path):
  task, config = _file_task(tmp_path, [
      {"prompt": "1+1=", "answer": "#### 2"}, {"prompt": "2*3=", "answer": "6"},
      {"prompt": "1+1=", "answer": "#### 2"}])
  table = task_lib.prompt_references(task, config)
  assert table == {tuple(task.tokenizer.encode("1+1=").ids): "#### 2",
                   tuple(task.tokenizer.encode("2*3=").ids): "6"}
  config.ppo.grader = "rlhf_jax.graders:gsm8k_exact"
  prompts = task_lib.prompts(task, config, "train") + task_lib.prompts(task, config, "eval")
  texts = [task.decode(p) for p in prompts]
  answers = {"1+1=": "2", "2*3=": "6"}
  responses = [task.tokenizer.encode(f"#### {answers[t]}").ids for t in texts]
  assert set(texts) == {"1+1=", "2*3="}  # The held-out part of the file too.
  assert grading.grade(task, config, prompts, responses).tolist() == [1.0] * len(prompts)
  # A prompt outside the file has no reference: the grader cannot score it.
  with pytest.raises(ValueError, match="requires a reference answer.*prompt '3\\+3='"):
    grading.grade(task, config, [task.tokenizer.encode("3+3=").ids], [[5]])


def test_file_prompts_conflicting_answers(tmp_path):
  task, config = _file_task(tmp_path, [{"prompt": "1+1=", "answer": "2"},
                                       {"prompt": "1+1=", "answer": "3"}])
  with pytest.raises(data.DataError, match=r"prompts.jsonl:2: the same prompt as .*"
                     r"prompts.jsonl:1 with another answer \('3', there '2'\)"):
    task_lib.prompt_references(task, config)


# ---------------------------------------------------------------------------------------------
# config.ppo.reward_source = "grader" in rl.validate
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("grader, match", [
    ("", "config.ppo.grader is empty but config.ppo.reward_source='grader'"),
    ("no_module_here", "config.ppo.grader='no_module_here': expected 'module:function'"),
    ("no_such_module_xyz:grade", "config.ppo.grader='no_such_module_xyz:grade': module "
     "'no_such_module_xyz' is not importable"),
    ("rlhf_jax.data.arithmetic_world:no_such", "config.ppo.grader=.*has no attribute"),
])
def test_rl_validate_rejects_bad_graders(grader, match):
  config = experiment_config("arithmetic/config.py", "runlocal,reward=grader")
  config.ppo.grader = grader
  with pytest.raises(ValueError, match=match):
    rl.validate(config)


def test_rl_validate_grader_combinations():
  config = experiment_config("arithmetic/config.py", "runlocal,reward=grader")
  rl.validate(config)
  config.ppo.reward_source = "gold"
  with pytest.raises(ValueError, match="config.ppo.grader=.* is set but config.ppo.reward_"
                     "source='gold'"):
    rl.validate(config)
  config.ppo.grader = ""
  rl.validate(config)  # The arithmetic world has a gold reward too.
  # A grader that needs reference answers, on a task that has none.
  review = experiment_config("ppo/review_world.py", "runlocal,algo=grpo,reward=gold")
  review.ppo.reward_source, review.ppo.grader = "grader", "rlhf_jax.graders:gsm8k_exact"
  with pytest.raises(ValueError, match="requires a reference answer .* "
                     "config.task.kind='review_world' has none"):
    rl.validate(review)
  review.task, review.data = task_lib.files_config()
  review.data.sft = "sft.jsonl"
  with pytest.raises(ValueError, match="requires a reference answer, read from the prompts "
                     "file: set config.data.prompts"):
    rl.validate(review)
  review.ppo.reward_source, review.ppo.grader = "gold", ""
  with pytest.raises(ValueError, match="reward_source='gold' needs a task with a gold reward"):
    rl.validate(review)


# ---------------------------------------------------------------------------------------------
# The user-data path: a prompts file with reference answers, graded by gsm8k_exact
# ---------------------------------------------------------------------------------------------

def _files_config(tmp_path, prompt_rows):
  """The arithmetic experiment's sections on a file task: the world's tokenizer saved as a
  user's tokenizer directory, its SFT data and `prompt_rows` written as JSONL files."""
  world = aw.ArithmeticWorld()
  tok_dir = tmp_path / "tokenizer"
  data.save_tokenizer_files(tok_dir, world.tokenizer, eos_token=aw.EOS, pad_token=aw.PAD,
                            unk_token=aw.UNK)
  config = experiment_config("arithmetic/config.py", "runlocal,reward=grader")
  config.task, config.data = task_lib.files_config()
  config.task.update(dict(tokenizer=str(tok_dir), max_prompt_len=8, max_response_len=40))
  config.data.sft = _write(tmp_path / "sft.jsonl", [
      {"prompt": e.prompt, "response": e.response} for e in world.sample_sft(200)])
  config.data.prompts = _write(tmp_path / "prompts.jsonl", prompt_rows)
  config.ppo.grader = "rlhf_jax.graders:gsm8k_exact"
  return config


def test_preflight_reads_reference_answers(tmp_path):
  from rlhf_jax.train import pipeline
  config = _files_config(tmp_path, [{"prompt": "1+2=", "answer": "3"}, {"prompt": "2*2="}])
  pipeline.validate(config)
  with pytest.raises(data.DataError, match=r"prompts.jsonl:2: missing field 'answer'.*"
                     r"\(config.data.prompts, config.data.answer_field\)"):
    pipeline.preflight(config)
  config.ppo.grader = "rlhf_jax.data.arithmetic_world:grade"  # Takes no reference answers.
  pipeline.preflight(config)


def test_grpo_on_a_prompts_file_with_answers(tmp_path):
  """SFT on a user's JSONL, then GRPO graded by gsm8k_exact against each prompt's "answer"
  field (GSM8K's own "#### N" solution text), through the library pipeline."""
  from rlhf_jax.train import pipeline
  world = aw.ArithmeticWorld()
  rows = [{"prompt": p, "answer": f"{aw.worked_answer(p)}"} for p in
          world.sample_prompts(40, seed=7)]
  config = _files_config(tmp_path, rows)
  config.model.update(dict(d_model=32, n_layers=1, n_heads=2, mlp_dim=64))
  config.sft.update(dict(steps=6, eval_every=0))
  config.ppo.update(dict(iterations=2, prompts_per_iter=4, group_size=4, minibatch_size=16,
                         max_new_tokens=24, eval_every=0))
  config.export.enabled = False
  pipeline.validate(config)
  pipeline.preflight(config)
  result = pipeline.run(config, str(tmp_path / "run"))
  assert result.evaluation == {}  # No gold reward on a file task: the grader is the reward.
  logged = [json.loads(l) for l in (tmp_path / "run" / "grpo" / "metrics.jsonl").read_text()
            .splitlines()]
  assert [m["step"] for m in logged] == [1, 2]
  assert all(0.0 <= m["grader_reward"] <= 1.0 and "gold_reward" not in m for m in logged)
