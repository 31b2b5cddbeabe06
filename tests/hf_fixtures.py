"""Random tiny transformers checkpoints written to disk, as references for parity tests."""
import numpy as np
import torch
import transformers

VOCAB = 96

# name -> (config class, kwargs). Small but covering every feature the loader maps.
HF_VARIANTS = {
    "gpt2": (transformers.GPT2Config, dict(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=48, bos_token_id=1,
        eos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    "llama_gqa_untied": (transformers.LlamaConfig, dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)),
    "llama_gqa_tied_llama3_rope": (transformers.LlamaConfig, dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=16),
        rope_theta=10000.0, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)),
    "qwen2": (transformers.Qwen2Config, dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=False, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)),
}


def make_hf_model(name: str, seed: int = 0, cls=transformers.AutoModelForCausalLM, **overrides):
  """A randomly initialised transformers model; every weight perturbed so biases and norm
  scales are far from their zero/one init and a mapping error cannot hide."""
  config_cls, kwargs = HF_VARIANTS[name]
  torch.manual_seed(seed)
  model = cls.from_config(config_cls(**{**kwargs, **overrides}), dtype=torch.float32)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.08 * torch.randn_like(p))
  return model.eval()  # Built from a config, a model starts in train mode (dropout).


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
  """Logits of one unpadded sequence [T] -> [T, V]."""
  with torch.no_grad():
    return model(torch.as_tensor(ids[None], dtype=torch.long)).logits[0].numpy()


# Our three architectures, each as one of the variants above (gpt2: tied embeddings; llama
# and qwen2: untied, grouped-query attention).
ARCH_VARIANTS = {"gpt2": "gpt2", "llama": "llama_gqa_untied", "qwen2": "qwen2"}


def our_config(name: str, **overrides):
  """The ModelConfig of HF variant `name` (what load_hf would build from its config.json)."""
  import dataclasses
  from rlhf_jax import models
  config_cls, kwargs = HF_VARIANTS[name]
  cfg = models.config_from_hf(config_cls(**kwargs).to_dict())
  return dataclasses.replace(cfg, **overrides)


def random_params(module, seed: int = 0):
  """Params of our `module`, every leaf perturbed (as make_hf_model does) so zero biases, unit
  norm scales and a zero-initialised value head cannot hide a mapping error."""
  import jax
  import jax.numpy as jnp
  from rlhf_jax.parallel import init_params
  key, noise = jax.random.split(jax.random.key(seed))
  params = init_params(module, key, jnp.ones((1, 4), jnp.int32))
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(noise, len(leaves))
  return jax.tree.unflatten(treedef, [x + 0.08 * jax.random.normal(k, x.shape, x.dtype)
                                      for x, k in zip(leaves, keys)])


def right_padded(lengths, pad_id: int, seed: int = 0, low: int = 3):
  """(ids, mask) [len(lengths), max(lengths)] int32: random tokens in [low, VOCAB), each row
  followed by `pad_id` padding. Tokens never equal `pad_id` when pad_id < low."""
  rng = np.random.RandomState(seed)
  width = max(lengths)
  ids = np.full((len(lengths), width), pad_id, np.int32)
  mask = np.zeros_like(ids)
  for row, n in enumerate(lengths):
    ids[row, :n] = rng.randint(low, VOCAB, size=n)
    mask[row, :n] = 1
  return ids, mask
