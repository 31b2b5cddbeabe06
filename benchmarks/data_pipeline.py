"""Host-side data pipeline throughput on the real hh-rlhf file, and review-world generation time.

  python benchmarks/data_pipeline.py              # reads ../shared/data/hh-rlhf/...test.jsonl.gz

Prints one JSON line: pairs/s for tokenise + batch (fixed-shape padded batches, and packed
batches of the same row length), the fraction of batch tokens that are padding in each layout
and how much packing saves, and the seconds the review world takes to generate 20k SFT
examples + 10k labelled pairs. The tokenizer is a byte-level BPE trained on the file itself
(no network); its training time is reported but not counted.
"""
import argparse
import functools
import json
import pathlib
import statistics
import time

import tokenizers
from tokenizers import decoders, pre_tokenizers, trainers
from tokenizers import models as tok_models

from rlhf_jax import data

DEFAULT_PATH = (pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" /
                "harmless-base-test.jsonl.gz")


def train_bpe(texts, vocab_size):
  tok = tokenizers.Tokenizer(tok_models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=["<pad>", "</s>"], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return tok


def one_epoch(pairs, tok, cfg, batcher):
  """Tokenise all pairs and draw one epoch of batches; returns (batches, tokenize result)."""
  res = data.tokenize_preferences(pairs, tok, cfg)
  it = data.DataIterator(res.examples, batcher, seed=0, num_epochs=1, process_index=0,
                         process_count=1)
  return list(it), res


def pad_fraction(masks) -> float:
  total = sum(m.size for m in masks)
  return 1.0 - sum(int(m.sum()) for m in masks) / total


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--path", default=str(DEFAULT_PATH))
  parser.add_argument("--vocab_size", type=int, default=8192)
  parser.add_argument("--max_prompt_len", type=int, default=256)
  parser.add_argument("--max_response_len", type=int, default=256)
  parser.add_argument("--batch_size", type=int, default=16, help="pairs per padded batch")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()

  start = time.perf_counter()
  pairs = data.read_preferences(args.path)
  read_s = time.perf_counter() - start
  start = time.perf_counter()
  tok = train_bpe([p.prompt + p.chosen for p in pairs] + [p.rejected for p in pairs],
                  args.vocab_size)
  train_s = time.perf_counter() - start
  cfg = data.TokenizeConfig(eos_id=tok.token_to_id("</s>"), pad_id=tok.token_to_id("<pad>"),
                            max_prompt_len=args.max_prompt_len,
                            max_response_len=args.max_response_len,
                            vocab_size=tok.get_vocab_size())
  length = cfg.seq_len
  padded = data.PaddedBatcher(args.batch_size, functools.partial(
      data.pad_preferences, prompt_len=cfg.max_prompt_len, response_len=cfg.max_response_len,
      pad_id=cfg.pad_id))
  # Same row length and the same number of rows as a padded batch (2 rows per pair).
  rows = 2 * args.batch_size
  packed = data.PackedBatcher(data.pack_preferences, rows=rows, length=length,
                              pad_id=cfg.pad_id, max_sequences=8 * rows)

  timings = {"padded": [], "packed": []}
  out = {}
  for _ in range(args.repeats):
    for name, batcher in (("padded", padded), ("packed", packed)):
      start = time.perf_counter()
      batches, res = one_epoch(pairs, tok, cfg, batcher)
      timings[name].append(time.perf_counter() - start)
      out[name] = (batches, res)

  padded_batches, res = out["padded"]
  packed_batches, _ = out["packed"]
  padded_masks = [m for b in padded_batches for m in (b.chosen.attention_mask,
                                                      b.rejected.attention_mask)]
  packed_masks = [b.tokens.attention_mask for b in packed_batches]
  pairs_padded = len(padded_batches) * args.batch_size  # The last partial batch is dropped.
  pairs_packed = int(sum(b.pair_mask.sum() for b in packed_batches))
  frac_padded, frac_packed = pad_fraction(padded_masks), pad_fraction(packed_masks)

  start = time.perf_counter()
  world = data.ReviewWorld()
  sft = world.sample_sft(20_000, seed=0)
  prefs = world.sample_preferences(10_000, k=4, seed=0)
  world_s = time.perf_counter() - start
  assert len(sft) == 20_000 and len(prefs) == 10_000

  print(json.dumps({
      "benchmark": "data_pipeline",
      "file": pathlib.Path(args.path).name,
      "pairs": len(pairs),
      "read_s": round(read_s, 3),
      "tokenizer": f"byte-level BPE, vocab {tok.get_vocab_size()} (trained in {train_s:.2f} s)",
      "max_prompt_len": cfg.max_prompt_len,
      "max_response_len": cfg.max_response_len,
      "truncated_prompts": res.truncated_prompts,
      "truncated_responses": res.truncated_responses,
      "padded_pairs_per_s": round(pairs_padded / statistics.median(timings["padded"]), 1),
      "packed_pairs_per_s": round(pairs_packed / statistics.median(timings["packed"]), 1),
      "padded_batches": len(padded_batches),
      "packed_batches": len(packed_batches),
      "batch_shape": [rows, length],
      "padded_pad_fraction": round(frac_padded, 4),
      "packed_pad_fraction": round(frac_packed, 4),
      "pad_fraction_saved": round(frac_padded - frac_packed, 4),
      "batch_tokens_ratio_packed_over_padded": round(
          sum(m.size for m in packed_masks) / sum(m.size for m in padded_masks), 4),
      "review_world_20k_sft_10k_pairs_s": round(world_s, 2),
  }))


if __name__ == "__main__":
  main()
