"""Users' model directories made in the tests: a byte-level BPE trained on hh-rlhf text with
chat special tokens, saved by transformers with a chat template in the style of a public one,
tiny transformers models of that vocabulary, and chat-format data files from hh-rlhf.

Everything is written with transformers' own save_pretrained, so the directories are what a
user brings.
"""
import gzip
import itertools
import json

import tokenizers
import torch
import transformers
from tokenizers import Regex, decoders, pre_tokenizers, processors, trainers
from tokenizers import models as tok_models

from rlhf_jax import data

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
            "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<s>",
            "</s>", "<pad>"]
# Llama 3's (and Qwen 2's) split: runs of newlines stay one pre-token, so "\n\n" at the end of
# a prompt is cut the same way alone as in front of the response.
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
         r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# Qwen2.5-Instruct style: ChatML with a default system message and a tools branch (tojson).
CHATML_QWEN = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- for tool_call in message.tool_calls %}
            {{- '\\n<tool_call>\\n' + tool_call.function | tojson + '\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Llama 3.1 Instruct style: BOS in the text, a dated system header (strftime_now), |trim.
LLAMA3 = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# name -> (template, special tokens, the special token the tokenizer itself puts first).
TOKENIZERS = {
    "chatml": (CHATML_QWEN, dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"), None),
    "llama3": (LLAMA3, dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                            pad_token="<|end_of_text|>"), "<|begin_of_text|>"),
}


def hh_rows(hh_rlhf_path, n: int) -> list[dict]:
  """The first n rows of the hh-rlhf file."""
  with gzip.open(hh_rlhf_path, "rt", encoding="utf-8") as f:
    return [json.loads(line) for line in itertools.islice(f, n)]


def train_bpe(texts, vocab_size: int = 1200) -> tokenizers.Tokenizer:
  """A byte-level BPE with Llama 3's pre-tokenizer split and the chat specials."""
  tok = tokenizers.Tokenizer(tok_models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(list(texts) + [CHATML_QWEN, LLAMA3], trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=SPECIALS,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return tok


def save_tokenizer(bpe, directory, template: str, special: dict, adds_bos: str | None = None,
                   ) -> transformers.PreTrainedTokenizerBase:
  """`save_pretrained` of `bpe` with the template into `directory`; returns transformers'
  reload of it."""
  tok = tokenizers.Tokenizer.from_str(bpe.to_str())
  if adds_bos is not None:  # As Llama's tokenizer.json does: BOS by post-processor.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{adds_bos} $A", pair=f"{adds_bos} $A {adds_bos} $B",
        special_tokens=[(adds_bos, tok.token_to_id(adds_bos))])
  hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template,
                                            **special)
  hf.save_pretrained(str(directory))
  return transformers.AutoTokenizer.from_pretrained(str(directory))


ARCHS = {
    "qwen2": (transformers.Qwen2Config, dict(num_key_value_heads=1)),
    "llama": (transformers.LlamaConfig, dict(num_key_value_heads=1)),
    "gpt2": (transformers.GPT2Config, {}),
}


def save_model(directory, arch: str, vocab_size: int, *, dtype=torch.float32,
               max_positions: int = 256, seed: int = 0, **overrides):
  """A tiny random causal LM of `arch` saved into `directory` (next to its tokenizer)."""
  config_cls, extra = ARCHS[arch]
  torch.manual_seed(seed)
  if arch == "gpt2":
    config = config_cls(vocab_size=vocab_size, n_embd=32, n_layer=1, n_head=2,
                        n_positions=max_positions, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, **overrides)
  else:
    config = config_cls(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=1, num_attention_heads=2,
                        max_position_embeddings=max_positions, tie_word_embeddings=False,
                        **{**extra, **overrides})
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  model.to(dtype).save_pretrained(str(directory))
  return model


def model_dir(root, name: str, bpe, *, tokenizer: str, arch: str, **model_kwargs):
  """root/name: the tokenizer flavour `tokenizer` and a tiny `arch` model of its vocabulary."""
  directory = root / name
  template, special, adds = TOKENIZERS[tokenizer]
  save_tokenizer(bpe, directory, template, special, adds)
  vocab = data.load_tokenizer_files(directory).min_vocab_size
  save_model(directory, arch, model_kwargs.pop("vocab_size", vocab), **model_kwargs)
  return directory


def _dicts(messages):
  return [{"role": m.role, "content": m.content} for m in messages]


def write_chat_files(directory, rows) -> dict[str, str]:
  """sft.jsonl ({"messages"}), pairs.jsonl (chat chosen/rejected lists) and prompts.jsonl
  ({"messages"} ending in the user turn) from hh-rlhf rows; returns their paths by kind."""
  directory.mkdir(parents=True, exist_ok=True)
  sft, pairs, prompts = [], [], []
  for row in rows:
    chosen, rejected = data.hh_messages(row["chosen"]), data.hh_messages(row["rejected"])
    if (chosen[-1].role != "assistant" or rejected[-1].role != "assistant"
        or chosen[:-1] != rejected[:-1] or not chosen[-1].content.strip()
        or not rejected[-1].content.strip() or chosen[-1] == rejected[-1]):
      continue
    sft.append({"messages": _dicts(chosen)})
    pairs.append({"chosen": _dicts(chosen), "rejected": _dicts(rejected)})
    prompts.append({"messages": _dicts(chosen[:-1])})
  paths = {}
  for kind, records in (("sft", sft), ("pairs", pairs), ("prompts", prompts)):
    paths[kind] = str(directory / f"{kind}.jsonl")
    with open(paths[kind], "w", encoding="utf-8") as f:
      f.writelines(json.dumps(r) + "\n" for r in records)
  return paths
