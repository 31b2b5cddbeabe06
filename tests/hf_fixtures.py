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
