"""Data: example types, readers (JSON Lines, JSON, Parquet), chat templates, tokenizer files,
tokenisation, padded/packed batches (and packed pair rows for DPO, KTO and reward models), a
resumable iterator, the embedded gold-reward tasks (the review world; the arithmetic world, whose
reward is verifiable) and, in
`rlhf_jax.data.tfds_hh`, a TFDS builder for hh-rlhf (imported on demand: it pulls in
tensorflow_datasets).

    files = data.load_tokenizer_files("path/to/model_dir")   # tokenizer, specials, template
    fmt = files.chat_format()              # the model's chat template (else hh markers)
    pairs = data.read_preferences("harmless-base-test.jsonl.gz", chat_format=fmt)
    cfg = data.TokenizeConfig(eos_id=files.eos_id, pad_id=files.pad_id,
                              bos_id=files.prompt_bos_id(fmt), max_prompt_len=256,
                              max_response_len=256, vocab_size=model_vocab)
    tokenized = data.tokenize_preferences(pairs, files.tokenizer, cfg).examples
    batcher = data.PaddedBatcher(8, functools.partial(data.pad_preferences, prompt_len=256,
                                                      response_len=256, pad_id=cfg.pad_id))
    it = data.DataIterator(tokenized, batcher, seed=0)   # save it.position; resume with it
"""
from rlhf_jax.data.arithmetic_world import ArithmeticWorld
from rlhf_jax.data.batching import (PackedBatch, PackedBatcher, PackedPairRows,
                                    PackedPreferenceBatch, PaddedBatcher, PreferenceBatch,
                                    SequenceBatch, UnpairedBatch, example_sequences,
                                    pack_pair_rows, pack_preferences, pack_rollouts,
                                    pack_sequences, pack_sft, pad_preferences, pad_sequences,
                                    pad_sft, pad_unpaired, pair_footprint, stack_pairs)
from rlhf_jax.data.chat import (ChatFormat, ChatRenderer, Message, hh_messages, split_hh_pair,
                                split_hh_transcript)
from rlhf_jax.data.chat_template import ChatTemplate
from rlhf_jax.data.errors import DataError, SkipReport
from rlhf_jax.data.examples import (PreferenceExample, PromptAnswer, SFTExample,
                                    UnpairedExample, sft_from_preferences,
                                    unpaired_from_preferences)
from rlhf_jax.data.iterator import DataIterator
from rlhf_jax.data.readers import (ReadResult, check_readable, read_preferences,
                                   read_preferences_with_stats, read_prompt_answers,
                                   read_prompt_answers_with_stats, read_prompts,
                                   read_prompts_with_stats, read_sft, read_sft_with_stats,
                                   read_unpaired, read_unpaired_with_stats)
from rlhf_jax.data.review_world import GoldScores, LabelResult, ReviewWorld, WorldConfig
from rlhf_jax.data.tokenization import (TokenizeConfig, TokenizedPair, TokenizedSFT,
                                        TokenizedUnpaired, TokenizeResult, encode_texts,
                                        tokenize_preferences, tokenize_sft, tokenize_unpaired)
from rlhf_jax.data.tokenizer import (TokenizerFiles, load_tokenizer, load_tokenizer_files,
                                     save_tokenizer_files, special_tokens, token_id,
                                     tokenizer_files_from)
