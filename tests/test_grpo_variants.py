"""GRPO variants by config (train/grpo_variants.py): each recipe's loss against its paper's
formula on a hand-made batch, DAPO's overlong punishment and dynamic sampling, the presets'
keys and the validation errors, and a short DAPO run with dynamic sampling."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import experiment_config, ppo_world, run_python
from rlhf_jax import objectives, parallel
from rlhf_jax.train import grpo_variants, rl
from rlhf_jax.train import ppo as ppo_lib

# ---------------------------------------------------------------------------------------------
# A hand-made batch: 2 prompts x 4 completions, responses of 1-4 tokens in a buffer of T = 4.
# ---------------------------------------------------------------------------------------------
K, T = 4, 4
REWARDS = [1.0, 0.0, 0.0, 1.0,    # group 0: two right, two wrong
           1.0, 1.0, 0.0, 0.5]    # group 1
LENGTHS = [1, 2, 3, 4, 4, 3, 2, 1]
# π_θ/π_old per token: 1.25 sits between 1 + 0.2 and DAPO's 1 + 0.28, 1.35 above both, 0.7
# below 1 − 0.2. Positions past a response's length are padding (never read).
RATIOS = [[1.25, 9, 9, 9], [0.7, 1.1, 9, 9], [1.35, 0.9, 1.0, 9], [1.25, 0.7, 1.1, 0.95],
          [0.9, 1.25, 1.35, 0.7], [1.1, 1.25, 0.85, 9], [0.7, 1.3, 9, 9], [1.2, 9, 9, 9]]
OLD_LOGP = -1.0
# log π_ref − log π_θ per token (the KL term's argument).
REF_DELTA = [[0.1, 0, 0, 0], [-0.2, 0.3, 0, 0], [0.0, 0.1, -0.1, 0], [0.2, 0.2, 0.2, 0.2],
             [-0.3, 0.1, 0.0, 0.1], [0.05, -0.05, 0.1, 0], [0.4, -0.1, 0, 0], [0.0, 0, 0, 0]]
BETA = 0.04  # DeepSeekMath's β.


def hand_advantages(std: bool) -> list[float]:
  """GRPO §4.1.2: Â_i = (r_i − mean(r)) / std(r), the sample std (ddof 1, as TRL and
  objectives.group_advantages); Dr. GRPO §3.1: Â_i = r_i − mean(r)."""
  out = []
  for g in range(len(REWARDS) // K):
    r = REWARDS[g * K:(g + 1) * K]
    mean = sum(r) / K
    sd = math.sqrt(sum((x - mean) ** 2 for x in r) / (K - 1))
    out += [(x - mean) / sd if std else x - mean for x in r]
  return out


def hand_surrogate(i: int, t: int, adv: float, eps_low: float, eps_high: float) -> float:
  """min(ρ·Â, clip(ρ, 1 − ε_low, 1 + ε_high)·Â): the objective's term (to maximise)."""
  rho = RATIOS[i][t]
  return min(rho * adv, min(max(rho, 1 - eps_low), 1 + eps_high) * adv)


def hand_kl(i: int, t: int) -> float:
  """DeepSeekMath eq. 4: π_ref/π_θ − log(π_ref/π_θ) − 1."""
  d = REF_DELTA[i][t]
  return math.exp(d) - d - 1


def hand_grpo_loss() -> float:
  """−J_GRPO, DeepSeekMath eq. 3:
  1/G Σ_i 1/|o_i| Σ_t [min(ρÂ, clip(ρ, 1 − ε, 1 + ε)Â) − β·D_KL]."""
  adv = hand_advantages(std=True)
  per_seq = [sum(hand_surrogate(i, t, adv[i], 0.2, 0.2) - BETA * hand_kl(i, t)
                 for t in range(n)) / n for i, n in enumerate(LENGTHS)]
  return -sum(per_seq) / len(per_seq)


def hand_dr_grpo_loss() -> float:
  """−J_Dr.GRPO, Liu et al. §3.1: no 1/|o_i| (each sequence's sum over the constant generation
  budget T, as their code does) and Â = r − mean(r); the KL term kept as in GRPO."""
  adv = hand_advantages(std=False)
  per_seq = [sum(hand_surrogate(i, t, adv[i], 0.2, 0.2) - BETA * hand_kl(i, t)
                 for t in range(n)) / T for i, n in enumerate(LENGTHS)]
  return -sum(per_seq) / len(per_seq)


def hand_dapo_loss() -> float:
  """−J_DAPO, Yu et al. eq. 8 and 12:
  1/Σ|o_i| Σ_i Σ_t min(ρÂ, clip(ρ, 1 − 0.2, 1 + 0.28)Â), no KL term; every group here has a
  reward spread, so dynamic sampling keeps them all."""
  adv = hand_advantages(std=True)
  total = sum(hand_surrogate(i, t, adv[i], 0.2, 0.28) for i, n in enumerate(LENGTHS)
              for t in range(n))
  return -total / sum(LENGTHS)


def ppo_cfg(variant: str, **extra):
  config = rl.default_config()
  config.update(dict(algorithm="grpo", group_size=K, max_new_tokens=T, kl_coef=BETA,
                     grpo_variant=variant, **extra))
  if variant == "dapo":
    config.kl_coef = 0.0
  whole = type(config)(dict(ppo=config))
  return grpo_variants.resolve(whole).ppo


def hand_batch():
  mask = np.array([[1.0] * n + [0.0] * (T - n) for n in LENGTHS], np.float32)
  logp = OLD_LOGP + np.log(np.array(RATIOS, np.float64))
  ref_logp = logp + np.array(REF_DELTA)
  # Padding holds garbage: the masked reductions must never read it.
  logp = np.where(mask > 0, logp, 50.0).astype(np.float32)
  return {"response_mask": jnp.asarray(mask),
          "old_logp": jnp.full((len(LENGTHS), T), OLD_LOGP, jnp.float32),
          "ref_logp": jnp.asarray(ref_logp, jnp.float32), "score": jnp.asarray(REWARDS),
          "logp": jnp.asarray(logp)}


def trainer_loss(cfg, batch, kl_coef):
  """The loss ppo_loss_fn builds from these pieces: advantages (compute_advantages), the
  clipped surrogate and the k3 KL in the loss, all reduced by config.ppo.loss_aggregation."""
  adv, _, _ = ppo_lib.compute_advantages(batch, kl_coef, cfg)
  agg = dict(aggregation=cfg.loss_aggregation, max_len=T)
  mask = batch["response_mask"]
  loss, _ = objectives.policy_loss(batch["logp"], batch["old_logp"], adv, mask,
                                   clip_eps=cfg.clip_eps, clip_eps_high=cfg.clip_eps_high, **agg)
  if not cfg.kl_in_reward:
    loss = loss + kl_coef * objectives.aggregate_loss(
        objectives.kl_penalty(batch["logp"], batch["ref_logp"], "k3"), mask, **agg)
  return loss, adv


@pytest.mark.parametrize("variant, hand, std", [("grpo", hand_grpo_loss, True),
                                                ("dr_grpo", hand_dr_grpo_loss, False),
                                                ("dapo", hand_dapo_loss, True)])
def test_variant_loss_equals_the_papers_formula(variant, hand, std):
  cfg = ppo_cfg(variant)
  batch = hand_batch()
  loss, adv = trainer_loss(cfg, batch, cfg.kl_coef)
  assert loss.dtype == adv.dtype == jnp.float32
  expected_adv = np.array(hand_advantages(std))[:, None] * np.asarray(batch["response_mask"])
  np.testing.assert_allclose(adv, expected_adv, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(loss), hand(), rtol=1e-5, atol=1e-7)


def test_clip_higher_changes_the_dapo_loss():
  """ρ = 1.25 with Â > 0 is clipped at 1.2 but not at 1.28: the variants' clips differ."""
  batch = hand_batch()
  dapo, _ = trainer_loss(ppo_cfg("dapo"), batch, 0.0)
  symmetric, _ = trainer_loss(ppo_cfg("", loss_aggregation="token_mean", kl_in_reward=False),
                              batch, 0.0)
  assert abs(float(dapo) - float(symmetric)) > 1e-3


def test_token_and_sequence_aggregation_differ_on_unequal_lengths():
  per_token = np.array([[1.0, 0, 0, 0], [2.0, 4.0, 0, 0], [3.0, 3.0, 6.0, 0]], np.float32)
  mask = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]], np.float32)
  token = float(objectives.aggregate_loss(per_token, mask, "dapo"))
  sequence = float(objectives.aggregate_loss(per_token, mask, "grpo"))
  dr = float(objectives.aggregate_loss(per_token, mask, "dr_grpo", max_len=4))
  assert token == pytest.approx((1 + 2 + 4 + 3 + 3 + 6) / 6)        # 19/6
  assert sequence == pytest.approx((1 / 1 + 6 / 2 + 12 / 3) / 3)    # 8/3
  assert dr == pytest.approx((1 / 4 + 6 / 4 + 12 / 4) / 3)          # 19/12
  assert abs(token - sequence) > 0.1


# ---------------------------------------------------------------------------------------------
# DAPO's pieces.
# ---------------------------------------------------------------------------------------------

def test_overlong_penalty_regimes_and_boundaries():
  """L_max = 10, L_cache = 4: 0 up to 6 tokens, then −1/4 per token, −1 at and past 10."""
  lengths = jnp.array([0, 5, 6, 7, 8, 9, 10, 11, 40], jnp.int32)
  r = objectives.overlong_penalty(lengths, 10, 4)
  assert r.dtype == jnp.float32
  np.testing.assert_allclose(r, [0, 0, 0, -0.25, -0.5, -0.75, -1, -1, -1], atol=1e-7)
  np.testing.assert_allclose(objectives.overlong_penalty(jnp.array([9, 10]), 10, 10),
                             [-0.9, -1.0], atol=1e-7)  # The window may span the whole budget.
  with pytest.raises(ValueError, match="cache_len"):
    objectives.overlong_penalty(lengths, 10, 11)
  with pytest.raises(ValueError, match="cache_len"):
    objectives.overlong_penalty(lengths, 10, 0)


def test_informative_groups():
  rewards = jnp.array([1, 1, 1, 1, 0, 1, 0, 0, 0.5, 0.5, 0.5, 0.5, -2, 3, 3, 3], jnp.float32)
  np.testing.assert_array_equal(objectives.informative_groups(rewards, 4),
                                [False, True, False, True])
  with pytest.raises(ValueError, match="groups of 3"):
    objectives.informative_groups(rewards, 3)


def _rows(*groups):
  return [g * K + j for g in groups for j in range(K)]


def test_dynamic_sampling_keeps_the_first_informative_groups_in_order():
  informative = [False, True, False, True, True]  # groups 1, 3 and 4 have a reward spread.
  rewards = np.concatenate([[0, 1, 1, 0] if i else [g] * K for g, i in enumerate(informative)])
  pick = objectives.select_informative_groups(rewards, K, 2)
  np.testing.assert_array_equal(pick.rows, _rows(1, 3))
  np.testing.assert_array_equal(pick.weights, np.ones(2 * K))
  assert (pick.kept, pick.informative) == (2, 3)
  assert pick.rows.dtype == np.int32 and pick.weights.dtype == np.float32
  # Too few: the three informative groups, then the first uninformative one at weight 0.
  pick = objectives.select_informative_groups(rewards, K, 4)
  np.testing.assert_array_equal(pick.rows, _rows(1, 3, 4, 0))
  np.testing.assert_array_equal(pick.weights, [1] * 3 * K + [0] * K)
  assert (pick.kept, pick.informative) == (3, 3)
  # None at all: a batch of zero weights.
  pick = objectives.select_informative_groups(np.ones(5 * K), K, 2)
  np.testing.assert_array_equal(pick.rows, _rows(0, 1))
  assert not pick.weights.any() and pick.kept == 0
  # Loss weights (overlong filtering) that mask every row of group 1 make it useless too.
  row_weights = np.ones(5 * K)
  row_weights[_rows(1)] = 0
  row_weights[_rows(3)[:3]] = 0
  pick = objectives.select_informative_groups(rewards, K, 2, row_weights=row_weights)
  np.testing.assert_array_equal(pick.rows, _rows(3, 4))
  assert (pick.kept, pick.informative) == (2, 2)
  with pytest.raises(ValueError, match="cannot fill 6"):
    objectives.select_informative_groups(rewards, K, 6)


# ---------------------------------------------------------------------------------------------
# The presets and validation.
# ---------------------------------------------------------------------------------------------

# What each variant documents (train/grpo_variants.py), written out again here.
DOCUMENTED = {
    "grpo": dict(grpo_std_normalize=True, loss_aggregation="seq_mean_token_mean",
                 kl_in_reward=False, clip_eps_high=None, dynamic_sampling=False,
                 overlong_cache=0, mask_truncated=False),
    "dr_grpo": dict(grpo_std_normalize=False, loss_aggregation="seq_mean_token_sum_norm",
                    kl_in_reward=False, clip_eps_high=None, dynamic_sampling=False,
                    overlong_cache=0, mask_truncated=False),
    "dapo": dict(grpo_std_normalize=True, loss_aggregation="token_mean", kl_in_reward=False,
                 kl_coef=0.0, clip_eps=0.2, clip_eps_high=0.28, dynamic_sampling=True,
                 mask_truncated=True, missing_eos_penalty=0.0, overlong_cache=20),
}


def _grpo_config(variant="", **ppo):
  """The review world's GRPO config with every key a variant sets back at the stage default
  (as if nobody had chosen them), then `variant` and the `ppo` keys."""
  config = experiment_config("ppo/review_world.py", "runlocal,algo=grpo,reward=gold")
  defaults = rl.default_config()
  for key in set().union(*DOCUMENTED.values()) | {"grpo_variant"}:
    config.ppo[key] = defaults[key]
  config.ppo.update(dict(dict(max_new_tokens=100, kl_in_reward=False, grpo_variant=variant), **ppo))
  return config


@pytest.mark.parametrize("variant", sorted(DOCUMENTED))
def test_presets_set_the_keys_they_document(variant):
  config = _grpo_config(variant)
  before = config.to_dict()
  resolved = grpo_variants.resolve(config)
  assert {k: resolved.ppo[k] for k in DOCUMENTED[variant]} == DOCUMENTED[variant]
  assert config.to_dict() == before  # A copy: the caller's config is unchanged.
  again = grpo_variants.resolve(resolved)
  assert again.to_dict() == resolved.to_dict()  # Idempotent.
  rl.validate(config)


def test_dapo_keeps_a_chosen_overlong_cache_and_accepts_aliases():
  resolved = grpo_variants.resolve(_grpo_config("dapo", overlong_cache=7,
                                                loss_aggregation="dapo"))
  assert resolved.ppo.overlong_cache == 7
  assert resolved.ppo.loss_aggregation == "token_mean"


def test_experiment_variant_argument_applies_the_preset():
  config = experiment_config("ppo/review_world.py", "runlocal,algo=grpo,variant=dr_grpo")
  assert config.ppo.grpo_variant == "dr_grpo"
  assert not config.ppo.grpo_std_normalize
  assert config.ppo.loss_aggregation == "seq_mean_token_sum_norm"


@pytest.mark.parametrize("variant, ppo, key", [
    ("dapo", dict(clip_eps_high=0.3), "config.ppo.clip_eps_high"),
    ("dapo", dict(kl_coef=0.1), "config.ppo.kl_coef"),
    ("dr_grpo", dict(loss_aggregation="grpo"), "config.ppo.loss_aggregation"),
    ("grpo", dict(dynamic_sampling=True), "config.ppo.dynamic_sampling"),
    ("dapo", dict(algorithm="rloo"), "config.ppo.algorithm"),
    ("drgrpo", {}, "config.ppo.grpo_variant"),
])
def test_variant_conflicts_name_the_key(variant, ppo, key):
  with pytest.raises(ValueError, match=key.replace(".", r"\.")):
    rl.validate(_grpo_config(variant, **ppo))


@pytest.mark.parametrize("ppo, key", [
    (dict(oversample=0), "config.ppo.oversample"),
    (dict(oversample=2), "config.ppo.oversample"),
    (dict(dynamic_sampling=True, algorithm="ppo", kl_in_reward=True),
     "config.ppo.dynamic_sampling"),
    (dict(dynamic_sampling=True, fused=True, reward_source="model"), "config.ppo.fused"),
    (dict(dynamic_sampling=True, oversample=1000), "config.ppo.train_prompts"),
    (dict(overlong_cache=-1), "config.ppo.overlong_cache"),
    (dict(overlong_cache=101), "config.ppo.overlong_cache"),
])
def test_validate_names_the_bad_key(ppo, key):
  with pytest.raises(ValueError, match=key.replace(".", r"\.")):
    rl.validate(_grpo_config(**ppo))


# ---------------------------------------------------------------------------------------------
# The iteration.
# ---------------------------------------------------------------------------------------------

def test_host_iteration_updates_on_the_informative_groups_only():
  """Dynamic sampling inside PPOTrainer.host_iteration, with rewards chosen per group: with no
  informative group the update batch has weight 0 everywhere and the fresh policy does not
  move (zero gradients, zero Adam moments); otherwise it holds the informative group first and
  an uninformative filler at weight 0."""
  config = experiment_config("ppo/review_world.py", "runlocal,algo=grpo,reward=gold")
  config.ppo.update(dict(grpo_variant="", prompts_per_iter=2, oversample=2,
                         dynamic_sampling=True, minibatch_size=4, epochs=1, max_new_tokens=4,
                         missing_eos_penalty=0.0))  # The score is then the reward itself.
  rl.validate(config)
  mesh = parallel.make_mesh({"data": 1})
  task, policy, sft, _, _ = ppo_world(config, mesh)
  trainer = ppo_lib.PPOTrainer(config, task, mesh, policy_module=policy, value_module=None,
                               ref_params=sft)
  prompts = next(ppo_lib.prompt_iterator(task, config, 0))
  assert prompts["ids"].shape[0] == 2 * 2 * K  # prompts_per_iter x oversample x group_size.
  ids, mask = jnp.asarray(prompts["ids"]), jnp.asarray(prompts["mask"])
  with parallel.mesh_context(mesh, "fsdp"):
    state = trainer.init_state({"policy": jax.tree.map(jnp.copy, sft)}, jax.random.key(0))
    before = jax.tree.map(np.asarray, state["params"])
    state, out = trainer.host_iteration(state, ids, mask, lambda samples: np.ones(16))
    assert out["metrics"]["dynamic_sampling/kept_groups"] == 0
    assert out["metrics"]["dynamic_sampling/informative_fraction"] == 0
    assert not np.asarray(out["batch"]["loss_weight"]).any()
    jax.tree.map(np.testing.assert_array_equal, before,
                 jax.tree.map(np.asarray, state["params"]))
    # Only group 2 of the 4 sampled has a reward spread.
    gold = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 0, 2, 3, 3, 3, 3], np.float32)
    state, out = trainer.host_iteration(state, ids, mask, lambda samples: gold)
  np.testing.assert_array_equal(out["batch"]["score"], gold[_rows(2, 0)])
  np.testing.assert_array_equal(out["batch"]["loss_weight"], [1] * K + [0] * K)
  assert out["metrics"]["dynamic_sampling/kept_groups"] == 1
  assert out["metrics"]["dynamic_sampling/informative_fraction"] == 0.25
  assert out["samples"].tokens.shape[0] == 16  # Rollout metrics see every sample.


def test_dapo_run_logs_dynamic_sampling(tmp_path):
  """A short DAPO run (dynamic sampling, 2x over-sampling, overlong shaping) end to end."""
  run_python(["-m", "rlhf_jax.main", "--config=experiments/ppo/review_world.py:runlocal,"
              "algo=grpo,variant=dapo,reward=gold", f"--workdir={tmp_path}",
              "--config.stages=('ppo',)",  # From fresh weights: the SFT stage adds nothing here.
              "--config.task.n_sft=200", "--config.task.n_eval=50",
              "--config.ppo.iterations=2", "--config.ppo.oversample=2",
              "--config.ppo.max_new_tokens=16", "--config.model.d_model=32",
              "--config.model.n_layers=1", "--config.model.n_heads=2",
              "--config.model.mlp_dim=64"])
  logged = [json.loads(l) for l in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
  assert len(logged) == 2
  groups = 32 // 4  # runlocal: 8 prompts of 4 completions per update.
  for m in logged:
    kept, fraction = m["dynamic_sampling/kept_groups"], m["dynamic_sampling/informative_fraction"]
    assert 0 <= fraction <= 1 and 0 <= kept <= groups
    assert kept == min(groups, round(fraction * 2 * groups))  # 16 groups sampled.
    assert m["skipped"] == 0
