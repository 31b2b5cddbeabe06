"""The review world: a small language of product reviews with a known generative process and
a programmatic gold reward, so RLHF can be studied end to end on a laptop.

This plays the role IMDb + a sentiment classifier play in the DPO paper (Rafailov et al.,
2023, section 6.1) and the synthetic gold RM plays in Gao et al. (2022, "Scaling laws for
reward model overoptimization"), except that everything is exact and generated from a seed:

* Text. A review is a few sentences ("the battery is really great . i would not recommend it
  to anyone .") drawn from a hidden Markov model: hidden state = (grammar slot, sentence
  polarity s); each slot emits one word of its category (neutral, or the positive/negative
  list picked by s). A latent review sentiment z in {neg, pos} draws each sentence's polarity
  (P(s = z) = `sentence_agreement`); "but the ASPECT is ..." flips it for a clause. With
  probability `noise` a slot emits a uniformly random word instead (typos, and the reason
  every word sequence has finite likelihood). After each sentence the review ends with
  probability `end_prob`; any other position ends with probability `stop_floor`.
  The seed draws the word weights within each slot and jitters the transition weights; the
  vocabulary (~280 words) and grammar are fixed, so the tokenizer is the same for every seed.
  Positive and negative word lists are mirror images (same sizes, same weights), so the
  process is symmetric in sentiment and fluency carries no polarity bias.
* Gold reward r*(prompt, response) = sentiment + fluency_weight * fluency, where
  sentiment = P(z = pos | prompt + response) under the process (the Bayes-optimal
  classifier: a "perfect" sentiment model), and fluency = the mean log-probability per
  response token (EOS included when present) under the process, given the prompt.
  Sentiment saturates after a few positive sentences; fluency collapses for word salad
  ("great great amazing perfect": each out-of-grammar word costs ~log(noise / V) ~ -11 nats).
  A proxy reward model learned from pairs, pushed hard, keeps rewarding "more positive words",
  so the policy drifts to positive word salad: proxy up, gold down (reward hacking).
* Data. SFT examples are prefixes (2-6 words, as the DPO IMDb prompts) and continuations of
  sampled reviews; preference pairs label any policy's samples with r*, deterministically or
  by Bradley-Terry sampling P(a > b) = sigmoid((r_a - r_b) / temperature) (label noise), with
  all k(k-1)/2 pairs of k samples per prompt (DPO paper, section 6.1).

Everything is numpy, vectorised over examples, and deterministic given the seeds.
"""
import dataclasses
import itertools
from typing import Sequence

import numpy as np
import tokenizers
from tokenizers import models as tok_models
from tokenizers import pre_tokenizers
from tqdm import auto as tqdm

from rlhf_jax.data.errors import DataError, SkipReport, SkipTally
from rlhf_jax.data.examples import PreferenceExample, SFTExample
from rlhf_jax.data.tokenization import TokenizeConfig

# ---------------------------------------------------------------------------------------------
# Vocabulary and grammar (fixed; the seed only draws probabilities)
# ---------------------------------------------------------------------------------------------

PAD, EOS, UNK = "[PAD]", "[EOS]", "[UNK]"
SPECIALS = (PAD, EOS, UNK)  # ids 0, 1, 2: the model config's default pad/eos ids.

PRODUCTS = tuple("""blender kettle toaster laptop phone tablet charger headphones speaker camera
backpack jacket tent lamp chair desk mattress pillow blanket watch keyboard mouse monitor printer
router drill vacuum fan heater mixer grill pan knife mug bottle bike helmet stroller umbrella
wallet sofa rug shelf oven fridge razor dryer scale thermos suitcase""".split())
ASPECTS = tuple("""battery screen price design quality sound handle lid color size weight fabric
strap cable button motor blade finish zipper display speed noise warranty delivery packaging
manual material grip fit smell""".split())
PERSONS = tuple("""anyone friends family everyone beginners students parents kids coworkers
neighbors travelers gamers""".split())
INTENSIFIERS = tuple("very really quite extremely so pretty truly incredibly super fairly".split())
NUMBERS = tuple("one two three four five six seven eight nine ten".split())
UNITS = tuple("days weeks months years uses trips".split())
# Polar categories: (positive words, negative words), mirror images of equal length.
ADJECTIVES = (tuple("""great excellent amazing wonderful fantastic perfect solid sturdy reliable
lovely superb brilliant impressive comfortable beautiful gorgeous smooth quiet bright crisp
elegant pleasant nice good flawless outstanding terrific durable handy useful charming delightful
stellar sleek cozy fabulous awesome marvelous sensible generous""".split()),
              tuple("""terrible awful horrible poor bad cheap flimsy broken useless disappointing
noisy dull ugly fragile weak clunky defective faulty lousy mediocre shoddy uncomfortable slow loud
dim blurry sticky leaky wobbly scratchy rough annoying frustrating pathetic dreadful nasty
unreliable clumsy awkward worthless""".split()))
VERBS = (tuple("love adore enjoy like appreciate treasure cherish praise trust value".split()),
         tuple("hate regret returned dislike despise distrust resent loathe doubt dread".split()))
OUTCOMES = (tuple("works runs performs holds shines lasts delivers impresses functions survives"
                  .split()),
            tuple("broke stopped failed cracked died leaked jammed snapped faded rusted".split()))
ADVERBS = (("still",), ("already",))
STARS = (("four", "five"), ("one", "two"))

# slot -> (words, [(next slot, weight, flip polarity)]). Words are a tuple (neutral) or a
# (positive, negative) pair of tuples. A weight is a number or (weight if s=neg, if s=pos).
# "punct" ends a sentence: the review stops there (end_prob) or a new sentence starts.
GRAMMAR = {
    # the ASPECT is [very] ADJ [and [very] ADJ | but the ASPECT is [very] ADJ'] .
    "a_det": (("the", "its", "my"), [("a_aspect", 1.0, False)]),
    "a_aspect": (ASPECTS, [("a_cop", 1.0, False)]),
    "a_cop": (("is", "was", "feels", "seems", "looks"),
              [("a_int", 0.35, False), ("a_adj", 0.65, False)]),
    "a_int": (INTENSIFIERS, [("a_adj", 1.0, False)]),
    "a_adj": (ADJECTIVES, [("punct", 0.6, False), ("a_and", 0.2, False), ("a_but", 0.2, False)]),
    "a_and": (("and",), [("a_int2", 0.3, False), ("a_adj2", 0.7, False)]),
    "a_int2": (INTENSIFIERS, [("a_adj2", 1.0, False)]),
    "a_adj2": (ADJECTIVES, [("punct", 1.0, False)]),
    "a_but": (("but", "yet"), [("b_det", 1.0, True)]),
    "b_det": (("the", "its"), [("b_aspect", 1.0, False)]),
    "b_aspect": (ASPECTS, [("b_cop", 1.0, False)]),
    "b_cop": (("is", "was", "feels", "seems"), [("b_int", 0.3, False), ("b_adj", 0.7, False)]),
    "b_int": (INTENSIFIERS, [("b_adj", 1.0, False)]),
    "b_adj": (ADJECTIVES, [("punct", 1.0, False)]),
    # i VERB this PRODUCT .
    "v_i": (("i", "we"), [("v_verb", 1.0, False)]),
    "v_verb": (VERBS, [("v_this", 1.0, False)]),
    "v_this": (("this", "the", "my"), [("v_product", 1.0, False)]),
    "v_product": (PRODUCTS, [("punct", 1.0, False)]),
    # it [still|already] OUTCOME after NUMBER UNIT .
    "o_it": (("it",), [("o_adv", 0.5, False), ("o_verb", 0.5, False)]),
    "o_adv": (ADVERBS, [("o_verb", 1.0, False)]),
    "o_verb": (OUTCOMES, [("o_after", 1.0, False)]),
    "o_after": (("after",), [("o_num", 1.0, False)]),
    "o_num": (NUMBERS, [("o_unit", 1.0, False)]),
    "o_unit": (UNITS, [("punct", 1.0, False)]),
    # i would [not] recommend it to PERSON .
    "r_i": (("i",), [("r_would", 1.0, False)]),
    "r_would": (("would", "will", "could"),
                [("r_not", (0.95, 0.05), False), ("r_rec", (0.05, 0.95), False)]),
    "r_not": (("not", "never"), [("r_rec", 1.0, False)]),
    "r_rec": (("recommend", "suggest"), [("r_it", 1.0, False)]),
    "r_it": (("it", "this"), [("r_to", 1.0, False)]),
    "r_to": (("to",), [("r_person", 1.0, False)]),
    "r_person": (PERSONS, [("punct", 1.0, False)]),
    # NUMBER stars .
    "s_num": (STARS, [("s_stars", 1.0, False)]),
    "s_stars": (("stars",), [("punct", 1.0, False)]),
    # overall , [very] ADJ PRODUCT .
    "x_overall": (("overall", "honestly", "basically"), [("x_comma", 1.0, False)]),
    "x_comma": ((",",), [("x_int", 0.3, False), ("x_adj", 0.7, False)]),
    "x_int": (INTENSIFIERS, [("x_adj", 1.0, False)]),
    "x_adj": (ADJECTIVES, [("x_product", 1.0, False)]),
    "x_product": (PRODUCTS, [("punct", 1.0, False)]),
    "punct": ((".", "!"), []),
}
SENTENCE_STARTS = (("a_det", 3.0), ("v_i", 2.0), ("o_it", 1.5), ("r_i", 1.5), ("s_num", 1.0),
                   ("x_overall", 1.0))


def _is_polar(words) -> bool:
  return isinstance(words[0], tuple)


def vocabulary() -> tuple[str, ...]:
  """Specials, then every word in grammar order (fixed across seeds)."""
  words = []
  for slot_words, _ in GRAMMAR.values():
    for w in (itertools.chain(*slot_words) if _is_polar(slot_words) else slot_words):
      if w not in words:
        words.append(w)
  return SPECIALS + tuple(words)


def build_tokenizer(vocab: Sequence[str]) -> tokenizers.Tokenizer:
  """A word-level `tokenizers.Tokenizer` (whitespace split); save it with `.save(path)`."""
  tok = tokenizers.Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(vocab)},
                                                  unk_token=UNK))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.add_special_tokens(list(SPECIALS))
  return tok


# ---------------------------------------------------------------------------------------------
# The world
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WorldConfig:
  seed: int = 0
  sentence_agreement: float = 0.8  # P(sentence polarity = review sentiment z).
  end_prob: float = 0.3  # P(review ends | a sentence just ended).
  noise: float = 0.005  # P(a slot emits a uniformly random word).
  stop_floor: float = 1e-4  # P(review ends) anywhere else.
  jitter: float = 0.25  # Seeded log-normal jitter of the transition weights.
  fluency_weight: float = 0.1
  min_prompt_words: int = 2
  max_prompt_words: int = 6
  max_review_words: int = 48  # Longer samples are redrawn (the process conditioned on length).


@dataclasses.dataclass(frozen=True)
class GoldScores:
  """Per-example arrays [N] (float64): reward = sentiment + fluency_weight * fluency."""
  reward: np.ndarray
  sentiment: np.ndarray
  fluency: np.ndarray


@dataclasses.dataclass(frozen=True)
class LabelResult:
  examples: list[PreferenceExample]
  report: SkipReport


class ReviewWorld:
  """The generative process, its exact likelihood, and data drawn from it.

  Attributes: `tokenizer` (word-level `tokenizers.Tokenizer`), `vocab`, `pad_id` = 0,
  `eos_id` = 1, `vocab_size`.
  """

  def __init__(self, config: WorldConfig = WorldConfig()):
    if not 1 <= config.min_prompt_words <= config.max_prompt_words < config.max_review_words:
      raise ValueError(f"need 1 <= min_prompt_words <= max_prompt_words < max_review_words, "
                       f"got {config}")
    self.config = config
    self.vocab = vocabulary()
    self.word_to_id = {w: i for i, w in enumerate(self.vocab)}
    self.tokenizer = build_tokenizer(self.vocab)
    self.pad_id, self.eos_id, self.unk_id = (self.word_to_id[t] for t in SPECIALS)
    self.vocab_size = len(self.vocab)
    self._build(np.random.default_rng([config.seed, 0]))

  # ---- process tables ------------------------------------------------------------------------

  def _build(self, rng: np.random.Generator) -> None:
    cfg = self.config
    slots = list(GRAMMAR)
    index = {name: i for i, name in enumerate(slots)}
    k = 2 * len(slots)  # state = 2 * slot + s, s = 1 for positive.
    v = self.vocab_size
    first_word = len(SPECIALS)

    emit = np.zeros((k, v))
    for name, (words, _) in GRAMMAR.items():
      lists = words if _is_polar(words) else (words, words)
      # One weight vector per slot, shared by the positive and negative lists (symmetry);
      # flatter for short lists so "." vs "!" is not a coin flip of the seed.
      weights = rng.dirichlet(np.full(len(lists[0]), max(1.0, 6.0 / len(lists[0]))))
      for s, ws in ((1, lists[0]), (0, lists[1])):
        for w, p in zip(ws, weights):
          emit[2 * index[name] + s, self.word_to_id[w]] += p
    noisy = (1 - cfg.noise) * emit
    noisy[:, first_word:] += cfg.noise / (v - first_word)
    self._emit_clean = emit
    # Scoring: specials other than EOS get the noise floor (a policy may emit anything).
    self._emit_score = noisy.copy()
    self._emit_score[:, :first_word] = cfg.noise / (v - first_word)

    starts = np.zeros(k // 2)
    for name, w in SENTENCE_STARTS:
      starts[index[name]] = w * np.exp(cfg.jitter * rng.standard_normal())
    starts /= starts.sum()
    agree = cfg.sentence_agreement
    p_s = np.asarray([[agree, 1 - agree], [1 - agree, agree]])  # p_s[z, s].
    init = np.zeros((2, k))
    for z in range(2):
      for s in range(2):
        init[z, s::2] = starts * p_s[z, s]
    trans = np.zeros((2, k, k))
    for name, (_, nexts) in GRAMMAR.items():
      u = index[name]
      for nxt, weight, flip in nexts:
        j = np.exp(cfg.jitter * rng.standard_normal())  # Shared by both polarities.
        for s in range(2):
          w = weight[s] if isinstance(weight, tuple) else weight
          s2 = 1 - s if flip else s
          trans[:, 2 * u + s, 2 * index[nxt] + s2] += w * j
    punct = index["punct"]
    for s in range(2):
      trans[:, 2 * punct + s, :] = init  # A new sentence: slot and fresh polarity given z.
    trans /= trans.sum(-1, keepdims=True)
    stop = np.full(k, cfg.stop_floor)
    stop[2 * punct:2 * punct + 2] = cfg.end_prob
    self._init = init  # [2, K] (each row sums to 1).
    self._trans = trans  # [2, K, K], rows sum to 1 (conditional on not stopping).
    self._stop = stop  # [K].
    self._prior = np.asarray([0.5, 0.5])
    self._init_cdf = np.cumsum(init, -1)
    self._trans_cdf = np.cumsum(trans, -1)
    self._emit_cdf = np.cumsum(emit, -1)
    self._first_word = first_word

  # ---- text <-> ids ------------------------------------------------------------------------

  def encode(self, text: str) -> np.ndarray:
    """Word ids (whitespace split; unknown words -> UNK), as the tokenizer does."""
    return np.asarray([self.word_to_id.get(w, self.unk_id) for w in text.split()], np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    """Words up to (not including) the first EOS."""
    out = []
    for i in ids:
      if int(i) == self.eos_id:
        break
      out.append(self.vocab[int(i)])
    return " ".join(out)

  def tokenize_config(self, max_prompt_len: int | None = None,
                      max_response_len: int | None = None, **kw) -> TokenizeConfig:
    """Lengths that never truncate this world's data: prompts <= max_prompt_words, responses
    <= max_review_words words + EOS."""
    return TokenizeConfig(eos_id=self.eos_id, pad_id=self.pad_id,
                          max_prompt_len=max_prompt_len or self.config.max_prompt_words,
                          max_response_len=max_response_len or self.config.max_review_words + 1,
                          vocab_size=kw.pop("vocab_size", self.vocab_size), **kw)

  # ---- sampling ------------------------------------------------------------------------------

  def _emit(self, rng: np.random.Generator, q: np.ndarray) -> np.ndarray:
    n = q.shape[0]
    u, noise, rand_word = rng.random(n), rng.random(n), rng.integers(
        self._first_word, self.vocab_size, n)
    clean = (self._emit_cdf[q] < u[:, None]).sum(-1)
    return np.where(noise < self.config.noise, rand_word, np.minimum(clean, self.vocab_size - 1))

  def _run(self, rng: np.random.Generator, z: np.ndarray, q: np.ndarray, steps: int,
           first_may_stop: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Continues chains in states q: tokens [N, steps] (PAD after the end), lengths, ended."""
    n = q.shape[0]
    k = self._stop.shape[0]
    tokens = np.full((n, steps), self.pad_id, np.int32)
    alive = np.ones(n, bool)
    ended = np.zeros(n, bool)
    lengths = np.zeros(n, np.int64)
    for t in range(steps):
      u_stop, u_next = rng.random(n), rng.random(n)
      stop_now = alive & (u_stop < self._stop[q])
      if t == 0 and not first_may_stop:
        stop_now[:] = False
      ended |= stop_now
      alive &= ~stop_now
      q_next = np.minimum((self._trans_cdf[z, q] < u_next[:, None]).sum(-1), k - 1)
      q = np.where(alive, q_next, q)
      x = self._emit(rng, q)
      tokens[alive, t] = x[alive]
      lengths += alive
      if not alive.any():
        break
    # A chain alive after `steps` tokens may still end right there.
    u_stop = rng.random(n)
    last = alive & (u_stop < self._stop[q])
    return tokens, lengths, ended | last

  def _sample_reviews_ids(self, rng: np.random.Generator, n: int
                          ) -> list[np.ndarray]:
    """n complete reviews (ended within max_review_words) as word-id arrays."""
    cfg = self.config
    out: list[np.ndarray] = []
    while len(out) < n:
      m = int((n - len(out)) * 1.05) + 8
      z = (rng.random(m) < self._prior[1]).astype(np.int64)
      q = np.minimum((self._init_cdf[z] < rng.random(m)[:, None]).sum(-1), len(self._stop) - 1)
      empty = rng.random(m) < cfg.stop_floor  # Ended before the first word: too short.
      first = self._emit(rng, q)
      rest, lengths, ended = self._run(rng, z, q, cfg.max_review_words - 1, True)
      ok = ended & ~empty & (lengths + 1 > cfg.min_prompt_words)
      for i in np.flatnonzero(ok):
        out.append(np.concatenate([[first[i]], rest[i, :lengths[i]]]).astype(np.int32))
    return out[:n]

  def _split_prompts(self, rng: np.random.Generator, reviews: list[np.ndarray]
                     ) -> list[tuple[np.ndarray, np.ndarray]]:
    cfg = self.config
    m = rng.integers(cfg.min_prompt_words, cfg.max_prompt_words + 1, len(reviews))
    return [(r[:min(k, len(r) - 1)], r[min(k, len(r) - 1):]) for r, k in zip(reviews, m)]

  def sample_reviews(self, n: int, seed: int = 0) -> list[str]:
    """n complete reviews drawn from the process."""
    rng = np.random.default_rng([self.config.seed, 1, seed])
    return [self.decode(r) for r in self._sample_reviews_ids(rng, n)]

  def sample_sft(self, n: int, seed: int = 0) -> list[SFTExample]:
    """SFT data: a 2-6 word prefix of a sampled review and the rest of it."""
    rng = np.random.default_rng([self.config.seed, 2, seed])
    pieces = self._split_prompts(rng, self._sample_reviews_ids(rng, n))
    return [SFTExample(self.decode(p), self.decode(r), f"review_world(seed={self.config.seed},"
                       f"sft_seed={seed}):{i}") for i, (p, r) in enumerate(pieces)]

  def sample_prompts(self, n: int, seed: int = 0) -> list[str]:
    """Prompts as in the SFT data: prefixes of sampled reviews."""
    return self._prompts(np.random.default_rng([self.config.seed, 3, seed]), n)

  def _prompts(self, rng: np.random.Generator, n: int) -> list[str]:
    return [self.decode(p) for p, _ in self._split_prompts(rng, self._sample_reviews_ids(rng,
                                                                                          n))]

  def sample_continuations(self, prompts: Sequence[str], k: int, seed: int = 0
                           ) -> list[list[str]]:
    """k continuations of each prompt drawn from the process itself (the ideal SFT policy),
    each non-empty and complete (ended within max_review_words words)."""
    return self._continuations(np.random.default_rng([self.config.seed, 4, seed]), prompts, k)

  def _continuations(self, rng: np.random.Generator, prompts: Sequence[str], k: int
                     ) -> list[list[str]]:
    ids = [self.encode(p) for p in prompts]
    alpha, _ = self._forward(ids, ended=np.zeros(len(ids), bool))
    alpha = np.repeat(alpha.reshape(len(ids), -1), k, axis=0)  # [N*k, 2K] posterior (z, q).
    cdf = np.cumsum(alpha, -1)
    todo = np.arange(alpha.shape[0])
    out: list[str | None] = [None] * alpha.shape[0]
    steps = self.config.max_review_words
    while todo.size:
      zq = np.minimum((cdf[todo] < rng.random(todo.size)[:, None] * cdf[todo, -1:]).sum(-1),
                      alpha.shape[1] - 1)
      z, q = zq // len(self._stop), zq % len(self._stop)
      tokens, lengths, ended = self._run(rng, z, q, steps, first_may_stop=False)
      for j in np.flatnonzero(ended):
        out[todo[j]] = self.decode(tokens[j, :lengths[j]])
      todo = todo[~ended]
    return [out[i * k:(i + 1) * k] for i in range(len(prompts))]

  # ---- exact likelihood and gold reward -----------------------------------------------------

  def _forward(self, seqs: Sequence[np.ndarray], ended: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """Scaled forward algorithm over the (z, slot, s) chain, batched.

    Returns the final posterior over (z, state) [N, 2, K] (after the EOS event where `ended`)
    and log p(token_t | tokens_<t) [N, L+1], with the EOS term at column `len` where ended.
    """
    n = len(seqs)
    lens = np.asarray([len(s) for s in seqs], np.int64)
    width = max(1, int(lens.max()) if n else 1)
    ids = np.full((n, width), self.pad_id, np.int64)
    for i, s in enumerate(seqs):
      ids[i, :len(s)] = s
    e_t = self._emit_score.T  # [V, K]
    logp = np.zeros((n, width + 1))
    # The process may end before its first word too (stop_floor), which keeps the next-token
    # distribution after an empty prefix normalised over words + EOS.
    alpha = ((1.0 - self.config.stop_floor) * self._prior[None, :, None] * self._init[None]
             * e_t[ids[:, 0]][:, None, :])
    alpha = np.where((lens > 0)[:, None, None], alpha,
                     self._prior[None, :, None] * self._init[None])
    c = alpha.sum((1, 2))
    logp[:, 0] = np.where(lens > 0, np.log(c), 0.0)
    alpha /= c[:, None, None]
    go = (1.0 - self._stop)[None, None, :]
    for t in range(1, width):
      live = t < lens
      if not live.any():
        break
      nxt = np.matmul((alpha * go).transpose(1, 0, 2), self._trans).transpose(1, 0, 2)
      nxt *= e_t[ids[:, t]][:, None, :]
      c = nxt.sum((1, 2))
      c_safe = np.where(live, c, 1.0)
      logp[:, t] = np.where(live, np.log(c_safe), 0.0)
      alpha = np.where(live[:, None, None], nxt / c_safe[:, None, None], alpha)
    end = alpha * np.where((lens > 0)[:, None, None], self._stop[None, None, :],
                           self.config.stop_floor)
    p_end = end.sum((1, 2))
    logp[np.arange(n), lens] = np.where(ended, np.log(p_end), 0.0)
    alpha = np.where(ended[:, None, None], end / p_end[:, None, None], alpha)
    return alpha, logp

  def score_ids(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]
                ) -> GoldScores:
    """Gold scores of token-id responses (e.g. policy samples). A response ends at its first
    EOS (later ids are ignored); one without EOS is scored as unfinished (no end event)."""
    if len(prompts) != len(responses):
      raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    seqs, ended, n_resp, n_prompt = [], [], [], []
    for p, r in zip(prompts, responses):
      p = np.asarray(p, np.int64)
      r = np.asarray(r, np.int64)
      stop = np.flatnonzero(r == self.eos_id)
      has_eos = bool(stop.size)
      r = r[:stop[0]] if has_eos else r
      both = np.concatenate([p, r])
      if both.size and (both.min() < 0 or both.max() >= self.vocab_size):
        raise ValueError(f"token ids must lie in [0, {self.vocab_size}) for this world")
      seqs.append(np.concatenate([p, r]))
      ended.append(has_eos)
      n_resp.append(len(r))
      n_prompt.append(len(p))
    ended = np.asarray(ended, bool)
    alpha, logp = self._forward(seqs, ended)
    n_prompt, n_resp = np.asarray(n_prompt), np.asarray(n_resp)
    cols = np.arange(logp.shape[1])[None, :]
    resp_mask = (cols >= n_prompt[:, None]) & (cols < (n_prompt + n_resp + ended)[:, None])
    count = resp_mask.sum(1)
    fluency = np.where(count > 0, (logp * resp_mask).sum(1) / np.maximum(count, 1), 0.0)
    sentiment = alpha[:, 1].sum(-1)
    reward = sentiment + self.config.fluency_weight * fluency
    return GoldScores(reward, sentiment, fluency)

  def score(self, prompts: Sequence[str], responses: Sequence[str], ended: bool = True
            ) -> GoldScores:
    """Gold scores of text responses; `ended` = the responses are complete (EOS follows)."""
    eos = [self.eos_id] if ended else []
    return self.score_ids([self.encode(p) for p in prompts],
                          [np.concatenate([self.encode(r), eos]).astype(np.int64)
                           for r in responses])

  def gold_reward(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    """r*(prompt, response) for complete text responses, [N] float64."""
    return self.score(prompts, responses).reward

  # ---- preference labelling ---------------------------------------------------------------

  def label_pairs(self, prompts: Sequence[str], samples: Sequence[Sequence[str]], *,
                  temperature: float = 0.0, seed: int = 0) -> LabelResult:
    """All k(k-1)/2 pairs of each prompt's k samples, labelled by the gold reward.

    temperature = 0: the higher gold reward is chosen (exact ties are skipped, counted);
    temperature > 0: chosen ~ Bradley-Terry, P(a > b) = sigmoid((r_a - r_b) / temperature),
    i.e. label noise that grows with the temperature. Identical responses never make a pair
    (counted as "identical"). margin = r*(chosen) - r*(rejected).
    """
    if temperature < 0:
      raise ValueError(f"temperature={temperature} must be >= 0")
    if len(prompts) != len(samples):
      raise ValueError(f"{len(prompts)} prompts but {len(samples)} sample lists")
    return self._label(np.random.default_rng([self.config.seed, 5, seed]), prompts, samples,
                       temperature)

  def _label(self, rng: np.random.Generator, prompts: Sequence[str],
             samples: Sequence[Sequence[str]], temperature: float) -> LabelResult:
    flat_p = [p for p, ss in zip(prompts, samples) for _ in ss]
    flat_r = [r for ss in samples for r in ss]
    rewards = self.score(flat_p, flat_r).reward if flat_r else np.zeros(0)
    tally = SkipTally("review_world pairs", "skip")
    out = []
    offset = 0
    for i, (prompt, ss) in enumerate(zip(prompts, samples)):
      r = rewards[offset:offset + len(ss)]
      for a, b in itertools.combinations(range(len(ss)), 2):
        where = f"review_world(seed={self.config.seed}):prompt {i}, samples {a},{b}"
        u = rng.random()  # Drawn for every pair, so labels do not shift when one is skipped.
        if ss[a] == ss[b]:
          tally.record(DataError(where, "identical samples", "identical"))
          continue
        diff = r[a] - r[b]
        if temperature == 0.0:
          if diff == 0.0:
            tally.record(DataError(where, "equal gold reward", "tie"))
            continue
          a_wins = diff > 0
        else:
          a_wins = u < 1.0 / (1.0 + np.exp(-diff / temperature))
        c, j = (a, b) if a_wins else (b, a)
        out.append(PreferenceExample(prompt, ss[c], ss[j], float(r[c] - r[j]), where))
      offset += len(ss)
    tally.kept = len(out)
    return LabelResult(out, tally.report())

  def sample_preferences(self, n_pairs: int, *, k: int = 4, temperature: float = 0.0,
                         seed: int = 0) -> list[PreferenceExample]:
    """n_pairs labelled pairs from k samples per prompt of the process itself."""
    if k < 2:
      raise ValueError(f"k={k}: need at least 2 samples per prompt")
    per_prompt = k * (k - 1) // 2
    out: list[PreferenceExample] = []
    round_ = 0
    with tqdm.tqdm(total=n_pairs, desc="review_world pairs", disable=None, leave=False) as bar:
      while len(out) < n_pairs:
        n_prompts = int((n_pairs - len(out)) / per_prompt * 1.1) + 1
        rng = np.random.default_rng([self.config.seed, 6, seed, round_])
        prompts = self._prompts(rng, n_prompts)
        got = self._label(rng, prompts, self._continuations(rng, prompts, k),
                          temperature).examples
        out.extend(got)
        bar.update(len(got))
        round_ += 1
    return out[:n_pairs]
