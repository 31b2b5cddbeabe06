"""Decoder backbone (GPT-2, Llama, Qwen2) with policy / value / reward heads; HF interop."""
from rlhf_jax.models.config import (ModelConfig, SIZES, config_from_dict, config_to_dict,
                                    get_config)
from rlhf_jax.models.layout import KVCache, last_token_index
from rlhf_jax.models.model import build_model, init_cache, transfer_backbone
from rlhf_jax.models.transformer import ROLES, Transformer
from rlhf_jax.models.hf import (SCORE_BIAS_KEY, HFCheckpointError, config_from_hf, config_to_hf,
                                load_hf, save_hf, source_dtype)
from rlhf_jax.models import lora
from rlhf_jax.models.lora import LoRAConfig, apply_lora, init_lora, merge_lora
