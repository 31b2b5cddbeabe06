"""GRPO variants by config: config.ppo.grpo_variant names a published recipe, which sets the
individual config.ppo keys it is made of (a lookup table, resolved at the start of the stage).

  ""         nothing: the individual keys as set (mix the pieces freely).
  "grpo"     GRPO (Shao et al. 2024, "DeepSeekMath", arXiv:2402.03300, eq. 3 and §4.1.2):
             std-normalised group advantages (r − mean) / std, the loss averaged over each
             sequence's tokens and then over sequences, the k3 KL to the reference in the loss
             (kl_coef = β, left to the run), symmetric clip.
               grpo_std_normalize=True, loss_aggregation="seq_mean_token_mean",
               kl_in_reward=False, clip_eps_high=None, dynamic_sampling=False,
               overlong_cache=0, mask_truncated=False
  "dr_grpo"  Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training",
             arXiv:2503.20783, §3.1): GRPO without its two biases, no std normalisation
             (A = r − mean) and no per-sequence length normalisation (each sequence's token sum
             over the constant max_new_tokens).
               grpo_std_normalize=False, loss_aggregation="seq_mean_token_sum_norm",
               kl_in_reward=False, clip_eps_high=None, dynamic_sampling=False,
               overlong_cache=0, mask_truncated=False
  "dapo"     DAPO (Yu et al. 2025, arXiv:2503.14476, eq. 8 and §3.1-3.4; Table 1 adds the pieces
             up): clip-higher (ε_low 0.2, ε_high 0.28), token-level aggregation (eq. 12), no KL
             term, dynamic sampling (keep the groups whose rewards differ), overlong filtering
             (truncated answers get loss weight 0) and soft overlong punishment (eq. 13) over
             the last fifth of max_new_tokens (the paper: 4,096 of 20,480 tokens); its length
             shaping replaces the missing-EOS penalty, which would punish a truncation twice.
               grpo_std_normalize=True, loss_aggregation="token_mean", kl_in_reward=False,
               kl_coef=0.0, clip_eps=0.2, clip_eps_high=0.28, dynamic_sampling=True,
               mask_truncated=True, missing_eos_penalty=0.0,
               overlong_cache=max_new_tokens // 5 (kept when set to another non-zero value)
             How many prompts are over-sampled for dynamic sampling (config.ppo.oversample) is
             a compute budget, not part of the recipe: set it yourself (DAPO samples until the
             batch is full; 2-3 is typical).

Every variant needs config.ppo.algorithm = "grpo". A variant owns its keys: one that holds
neither the stage default (rl.default_config) nor the variant's value was set on purpose and
is an error naming the key, rather than being overwritten in silence (a key set explicitly to
its default cannot be told apart from one left alone, and takes the variant's value). To tune
one of them, set grpo_variant = "" and every key yourself. The resolved config is a copy: the
caller's config is not changed, and resolving twice gives the same config.
"""
import copy

import ml_collections

from rlhf_jax import objectives

_NO_EXTRAS = dict(dynamic_sampling=False, overlong_cache=0, mask_truncated=False)
GRPO_VARIANTS = {
    "grpo": dict(grpo_std_normalize=True, loss_aggregation="seq_mean_token_mean",
                 kl_in_reward=False, clip_eps_high=None, **_NO_EXTRAS),
    "dr_grpo": dict(grpo_std_normalize=False, loss_aggregation="seq_mean_token_sum_norm",
                    kl_in_reward=False, clip_eps_high=None, **_NO_EXTRAS),
    "dapo": dict(grpo_std_normalize=True, loss_aggregation="token_mean", kl_in_reward=False,
                 kl_coef=0.0, clip_eps=0.2, clip_eps_high=0.28, dynamic_sampling=True,
                 mask_truncated=True, missing_eos_penalty=0.0),
}
VARIANT_NAMES = ("",) + tuple(GRPO_VARIANTS)
# DAPO's soft-punishment window is a fifth of the generation limit: L_cache / L_max =
# 4,096 / 20,480 in the paper (§4.1).
DAPO_CACHE_DIVISOR = 5


def variant_overrides(name: str, ppo_cfg=None) -> dict:
  """The config.ppo keys and values variant `name` sets ({} for ""). DAPO's overlong_cache
  depends on ppo_cfg.max_new_tokens (and keeps a non-zero ppo_cfg.overlong_cache), so "dapo"
  needs ppo_cfg."""
  if name not in VARIANT_NAMES:
    raise ValueError(f"config.ppo.grpo_variant={name!r}: expected one of {VARIANT_NAMES}")
  if not name:
    return {}
  overrides = dict(GRPO_VARIANTS[name])
  if name == "dapo":
    if ppo_cfg is None:
      raise ValueError("the 'dapo' variant sizes overlong_cache from config.ppo.max_new_tokens: "
                       "pass config.ppo")
    overrides["overlong_cache"] = (ppo_cfg.overlong_cache or
                                   ppo_cfg.max_new_tokens // DAPO_CACHE_DIVISOR)
  return overrides


def _same(key: str, a, b) -> bool:
  if key == "loss_aggregation":  # Aliases name the same reduction ("grpo" = seq_mean_...).
    a, b = (objectives.LOSS_AGGREGATIONS.get(x, x) for x in (a, b))
  return a == b


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` with config.ppo.grpo_variant's keys set (the config itself when the
  variant is ""). Raises ValueError naming the key for an unknown variant, an algorithm other
  than "grpo", or a key the variant sets that was set on purpose to something else."""
  cfg = config.ppo
  name = cfg.grpo_variant
  overrides = variant_overrides(name, cfg)
  if not overrides:
    return config
  if cfg.algorithm != "grpo":
    raise ValueError(f"config.ppo.grpo_variant={name!r} is a GRPO recipe: it needs "
                     f"config.ppo.algorithm='grpo', got {cfg.algorithm!r}")
  from rlhf_jax.train import rl  # rl imports this module (and ppo, which imports it too).
  defaults = rl.default_config()
  for key, value in overrides.items():
    current = cfg[key]
    if not (_same(key, current, value) or _same(key, current, defaults[key])):
      raise ValueError(
          f"config.ppo.{key}={current!r} conflicts with config.ppo.grpo_variant={name!r}, "
          f"which sets it to {value!r}: leave it at its default ({defaults[key]!r}), or set "
          f"grpo_variant='' and choose every key yourself")
  resolved = copy.deepcopy(config)
  for key, value in overrides.items():
    resolved.ppo[key] = value
  return resolved
