"""Jitted sampling with a KV cache, as a fixed batch or with continuous batching (temperature,
top-k, top-p, greedy, EOS), and best-of-n."""
from rlhf_jax.sampling.best_of_n import (BestOfN, best_of_n, best_of_n_distribution,
                                         best_of_n_kl, best_of_n_kl_estimate)
from rlhf_jax.sampling.sampler import (Samples, SamplingConfig, filter_logits, generate,
                                       response_logprobs, sampling_config, sequences)
