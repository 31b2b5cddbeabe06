"""Optimiser and learning-rate schedule from config (optax only).

AdamW epsilon semantics: optax (like PyTorch) adds `eps` to sqrt(v̂) *after* bias correction:
    update = m̂ / (sqrt(v̂) + eps),  m̂ = m / (1 − β1^t),  v̂ = v / (1 − β2^t).
TF1/Keras Adam adds its ε to sqrt(v) *before* bias correction, so a TF ε corresponds to an
optax eps of ε_TF / sqrt(1 − β2^t): large early in training and shrinking towards ε_TF.
Porting a TF recipe at equal ε therefore takes larger steps in the first few hundred updates.
(`eps_root` is the other optax knob: added inside the sqrt; keep it 0 unless differentiating
through the optimiser.)
"""
import jax
import ml_collections
import optax

SCHEDULES = ("cosine", "linear", "constant")


def make_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to cfg.lr over cfg.warmup_steps, then cosine or linear decay to
  cfg.lr * cfg.end_lr_fraction at total_steps, or constant."""
  if cfg.schedule not in SCHEDULES:
    raise ValueError(f"config.optim.schedule={cfg.schedule!r}; expected one of {SCHEDULES}")
  warmup = min(cfg.warmup_steps, total_steps)
  decay_steps = max(total_steps - warmup, 1)
  end = cfg.lr * cfg.end_lr_fraction
  if cfg.schedule == "cosine":
    after = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.end_lr_fraction)
  elif cfg.schedule == "linear":
    after = optax.linear_schedule(cfg.lr, end, decay_steps)
  else:
    after = optax.constant_schedule(cfg.lr)
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), after], [warmup])


def _decay_mask(params):
  """Weight decay on matrices only: not on biases, norm scales or other vectors."""
  return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """clip_by_global_norm(cfg.grad_clip) (if > 0) then AdamW with the schedule above."""
  schedule = make_schedule(cfg, total_steps)
  adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                      weight_decay=cfg.weight_decay, mask=_decay_mask)
  if cfg.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw), schedule
  return adamw, schedule


def default_optim_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      lr=1e-3, warmup_steps=10, schedule="cosine", end_lr_fraction=0.1, b1=0.9, b2=0.95,
      eps=1e-8, weight_decay=0.01, grad_clip=1.0, accum_steps=1))
