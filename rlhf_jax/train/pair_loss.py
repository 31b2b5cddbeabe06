"""The DPO family's loss_fn for step.make_train_step, shared by the preference stages: offline
DPO on a fixed set of pairs (train/preference.py) and online / iterative DPO on pairs of the
policy's own samples (train/online_dpo.py). It lives beside the stages, not in either of them,
so that neither stage imports the other and both train with one step per objective.

The loss itself is objectives.preference_loss (a key of objectives.PREFERENCE_LOSSES); this
module only turns a batch of pair rows into the per-pair log-probs it reads, in one of the row
layouts of train.scoring (unshared, prefix-shared, packed).
"""
import jax
import jax.numpy as jnp
import ml_collections

from rlhf_jax import objectives
from rlhf_jax.train import scoring

REFERENCE_FREE = ("simpo", "orpo")
# Config keys of a preference section (config.dpo, config.online_dpo) that each loss takes as
# keyword hyperparameters.
LOSS_HPARAMS = {"sigmoid": ("label_smoothing",), "robust": ("label_smoothing",),
                "simpo": ("gamma",), "ipo": ("length_normalized",)}


def preference_loss_fn(module, cfg: ml_collections.ConfigDict, prompt_len: int,
                       beta_in_state: bool = False):
  """loss_fn for step.make_train_step: the summed per-pair losses; count = pairs.

  `cfg` holds loss, beta, nll_weight, reference ("model" | "precomputed" | "none"),
  shared_prefix, packing.rows and the loss's LOSS_HPARAMS (config.dpo has them all).
  Its extra state entries are the reference params ("ref", for reference = "model") and, with
  `beta_in_state`, β as the last one (a traced scalar instead of cfg.beta, so a vmap over
  stacked states sweeps it: train.sweep). With cfg.packing.rows > 0 the batch is packed pair
  rows (preference._collate_fn): per-slot values, empty slots masked out of the losses, the
  metrics and the count. A padded batch may carry a "pair_mask" [B] too (online DPO masks
  the pairs whose two samples tie): masked pairs count for nothing either.
  """
  hparams = {k: cfg[k] for k in LOSS_HPARAMS.get(cfg.loss, ())}
  packed = cfg.packing.rows > 0
  if packed:
    logps_of = lambda p, b: scoring.packed_pair_logps(module, p, b)
  else:
    logps_of = lambda p, b: scoring.pair_logps(module, p, b, prompt_len=prompt_len,
                                               shared_prefix=cfg.shared_prefix)

  def loss_fn(params, batch, rng_key, *extra):
    del rng_key
    ref, beta = (extra[:-1], extra[-1]) if beta_in_state else (extra, cfg.beta)
    s_c, s_r, n_c, n_r = logps_of(params, batch)
    if cfg.reference == "model":
      ref_c, ref_r, _, _ = jax.lax.stop_gradient(logps_of(ref[0], batch))
    elif cfg.reference == "precomputed":
      ref_c, ref_r = batch["ref_chosen"].reshape(-1), batch["ref_rejected"].reshape(-1)
    else:
      ref_c = ref_r = None
    mask = batch["pair_mask"].reshape(-1) if packed or "pair_mask" in batch else None
    logps = objectives.PreferenceLogps(policy_chosen=s_c, policy_rejected=s_r, ref_chosen=ref_c,
                                       ref_rejected=ref_r, chosen_tokens=n_c,
                                       rejected_tokens=n_r, mask=mask)
    losses, metrics = objectives.preference_loss(cfg.loss, logps, beta=beta,
                                                 nll_weight=cfg.nll_weight, **hparams)
    pairs = (jnp.asarray(losses.shape[0], jnp.float32) if mask is None else
             jnp.sum(mask.astype(jnp.float32)))
    # Batch means -> sums, so that accumulation renormalises by the global pair count.
    return jnp.sum(losses), (pairs, {k: v * pairs for k, v in metrics.items()})
  return loss_fn
