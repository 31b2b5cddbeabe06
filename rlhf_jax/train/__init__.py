"""Host side of training: optimiser, train state, the generic step and loop, checkpoints,
metrics, and one run function per stage (sft.run_sft, reward.run_reward)."""
