"""Host side of training. The engine: optimiser (optim), train state (state), the generic step
(step), the resumable loop (loop), checkpoints (checkpoint) and metric writers (metrics). The
stages, one module each with default_config / validate / run -> stage.StageResult: sft,
reward, preference (DPO family, KTO), online_dpo (online / iterative DPO), rl (PPO / GRPO /
RLOO; its iteration in ppo) and best_of_n; pipeline chains them. Shared by the stages: stage,
task, scoring, pair_loss (the DPO family's loss_fn); sweep runs one-compile sweeps over a
stage's scalar."""
