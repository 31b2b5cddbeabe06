"""The review world: determinism, an exact likelihood, a gold reward that ranks hand-made
responses correctly (and punishes positive word salad), and preference labelling."""
import itertools

import numpy as np
import pytest

from rlhf_jax import data


@pytest.fixture(scope="module")
def world():
  return data.ReviewWorld()


def test_deterministic_from_seed():
  a, b, c = (data.ReviewWorld(data.WorldConfig(seed=s)) for s in (1, 1, 2))
  assert a.sample_sft(200, seed=0) == b.sample_sft(200, seed=0)
  assert a.sample_preferences(60, k=4, seed=0) == b.sample_preferences(60, k=4, seed=0)
  assert a.sample_sft(200, seed=0) != a.sample_sft(200, seed=1)  # The data seed matters,
  assert a.sample_sft(200, seed=0) != c.sample_sft(200, seed=0)  # and so does the world's.
  # The vocabulary (and so the tokenizer) is the same for every seed.
  assert a.vocab == c.vocab and a.tokenizer.get_vocab() == c.tokenizer.get_vocab()


def test_vocabulary_and_tokenizer(world, tmp_path):
  assert 200 <= world.vocab_size <= 2000
  assert (world.pad_id, world.eos_id) == (0, 1)
  text = "the battery is really great . i love this kettle !"
  ids = world.tokenizer.encode(text, add_special_tokens=False).ids
  assert ids == world.encode(text).tolist() and world.decode(ids + [1, 0, 5]) == text
  world.tokenizer.save(str(tmp_path / "tokenizer.json"))
  assert data.load_tokenizer(tmp_path).encode(text).ids == ids


def test_sft_data_is_complete_and_fits_the_tokenize_config(world):
  sft = world.sample_sft(500, seed=3)
  assert all(2 <= len(e.prompt.split()) <= 6 and e.response for e in sft)
  # Responses end a sentence: reviews end after "." or "!", except where noise replaced that
  # last word (p = noise = 0.5%) or a stop_floor event ended one early (~0.1%).
  assert np.mean([e.response.split()[-1] in (".", "!") for e in sft]) > 0.98
  res = data.tokenize_sft(sft, world.tokenizer, world.tokenize_config())
  assert len(res.examples) == 500 and res.truncated_prompts == res.truncated_responses == 0
  assert all(e.response[-1] == world.eos_id for e in res.examples)


def test_likelihood_is_normalised(world):
  """Next-token probabilities from the forward algorithm sum to 1 over words + EOS."""
  for prefix in ["", "the battery", "i would not recommend it to anyone ."]:
    p = world.encode(prefix)
    words = range(3, world.vocab_size)
    conts = [np.asarray([w], np.int64) for w in words] + [np.asarray([world.eos_id])]
    scores = world.score_ids([p] * len(conts), conts)
    # Fluency of a one-token response is that token's log-probability.
    assert np.exp(scores.fluency).sum() == pytest.approx(1.0, abs=1e-9), prefix


GOOD = "really great . i love this kettle ."
NEG = "really awful . i hate this kettle ."
SALAD = "great great great amazing perfect wonderful excellent"


def test_gold_reward_ranks_hand_made_responses(world):
  prompt = "the battery is"
  responses = [GOOD, NEG, SALAD,
               ". kettle this love i great really battery the",  # GOOD's words, shuffled
               "great .",
               "awful .",
               "really great . i would recommend it to anyone . five stars ."]
  s = world.score([prompt] * len(responses), responses)
  good, neg, salad, shuffled, short_pos, short_neg, long_pos = s.reward
  assert good > neg and short_pos > short_neg and long_pos > neg
  assert good > shuffled and good > salad
  # Reward hacking's signature: word salad is as positive as a good review but far less
  # fluent, and its gold reward falls below that of ordinary samples of the process.
  assert s.sentiment[2] > 0.8 and s.sentiment[1] < 0.1
  assert s.fluency[2] < s.fluency[0] - 4.0
  sft = world.sample_sft(2000, seed=0)
  typical = world.gold_reward([e.prompt for e in sft], [e.response for e in sft]).mean()
  assert salad < typical < good


def test_score_ids_reads_up_to_eos(world):
  p = world.encode("the lid is")
  r = world.encode("great .")
  eos, pad = world.eos_id, world.pad_id
  ended = world.score_ids([p], [np.concatenate([r, [eos, pad, pad]])])
  same = world.score([("the lid is")], ["great ."])
  unfinished = world.score_ids([p], [r])
  assert ended.reward[0] == pytest.approx(same.reward[0])
  assert unfinished.fluency[0] != pytest.approx(ended.fluency[0])
  with pytest.raises(ValueError, match="token ids must lie in"):
    world.score_ids([p], [np.asarray([world.vocab_size])])


def test_all_pairs_deterministic_labels(world):
  prompts = world.sample_prompts(30, seed=1)
  samples = world.sample_continuations(prompts, k=4, seed=1)
  assert all(len(s) == 4 and all(s) for s in samples)
  res = world.label_pairs(prompts, samples)
  distinct = sum(a != b for s in samples for a, b in itertools.combinations(s, 2))
  assert len(res.examples) == distinct  # Every pair of distinct samples, once.
  assert res.report.kept == distinct
  assert sum(res.report.skipped.values()) == 30 * 6 - distinct
  for ex in res.examples:
    r_c, r_r = world.gold_reward([ex.prompt] * 2, [ex.chosen, ex.rejected])
    assert r_c > r_r and ex.margin == pytest.approx(r_c - r_r)


def test_identical_samples_are_counted_not_paired(world):
  res = world.label_pairs(["the lid is"], [["great .", "great .", "awful ."]])
  assert [(e.chosen, e.rejected) for e in res.examples] == [("great .", "awful ."),
                                                           ("great .", "awful .")]
  assert res.report.skipped == {"identical": 1}


def test_bradley_terry_label_noise(world):
  prompts = world.sample_prompts(400, seed=2)
  samples = world.sample_continuations(prompts, k=4, seed=2)
  exact = world.label_pairs(prompts, samples).examples
  flipped = {}
  for temperature in (0.05, 0.3):
    noisy = world.label_pairs(prompts, samples, temperature=temperature, seed=5).examples
    assert len(noisy) == len(exact)
    margins = np.asarray([e.margin for e in noisy])
    flipped[temperature] = np.mean(margins < 0)  # chosen has the lower gold reward
    # Each pair flips with probability sigmoid(-|r_a - r_b| / temperature).
    expected = np.mean(1 / (1 + np.exp(np.abs(margins) / temperature)))
    assert flipped[temperature] == pytest.approx(expected, abs=0.03)
  assert 0.0 < flipped[0.05] < flipped[0.3]


def test_sample_preferences(world):
  pairs = world.sample_preferences(500, k=4, seed=0)
  assert len(pairs) == 500
  assert all(p.chosen != p.rejected and p.margin > 0 for p in pairs)
  assert len({p.source for p in pairs}) == 500
  tokenized = data.tokenize_preferences(pairs, world.tokenizer, world.tokenize_config())
  assert len(tokenized.examples) == 500 and tokenized.truncated_responses == 0
