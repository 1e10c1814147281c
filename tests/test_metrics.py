"""Text metrics (vlm_jax.metrics): every expected value below is worked out by hand from the metric's definition
(the CIDEr-D ones as explicit arithmetic on n-gram counts listed in comments), never produced by the code."""
import math

import pytest

from vlm_jax import metrics
from vlm_jax.metrics import anls, cider, exact_match, normalize, relaxed_accuracy, vqa_accuracy, vqa_normalize


def test_registries_name_the_metrics():
  assert metrics.PER_EXAMPLE == {"exact_match": exact_match, "vqa_accuracy": vqa_accuracy, "anls": anls,
                                 "relaxed_accuracy": relaxed_accuracy}
  assert metrics.CORPUS == {"cider": cider}


# ---------------------------------------------------------------------------------------------- exact match


def test_normalize_lowercases_strips_and_collapses_whitespace():
  assert normalize("  The\tBig \n Cat ") == "the big cat"
  assert normalize("") == ""


def test_exact_match_against_any_answer():
  assert exact_match("  The  Cat\n", ["the cat"]) == 1.0
  assert exact_match("cat", ["dog", "CAT"]) == 1.0
  assert exact_match("cat", ["dog", "cats"]) == 0.0
  assert exact_match("cat", ["the cat"]) == 0.0  # no article dropping: that is vqa_normalize's job
  assert exact_match("cat.", ["cat"]) == 0.0     # nor punctuation


# ---------------------------------------------------------------------------------------------- VQAv2


@pytest.mark.parametrize("text, expected", [
    ("Two", "2"),                    # lowercase, then number word -> digit
    ("none", "0"),                   # the official number table maps "none" too
    ("ten", "10"),
    ("the dog.", "dog"),             # article dropped, final period removed
    ("An Apple", "apple"),
    ("a red car", "red car"),
    ("dont", "don't"),               # contractions table
    ("isnt", "isn't"),
    ("Whats up?", "what's up"),      # "?" -> space, then "whats" -> "what's"
    ("yes!", "yes"),                 # "!" not next to a space -> space, then whitespace collapsed
    ("1,000", "1000"),               # digit-comma-digit: punctuation deleted, not spaced
    ("1,000 cat/dog", "1000 catdog"),  # ... and that holds for every mark in the text
    ("cat/dog", "cat dog"),          # without a number comma, a mark inside a word becomes a space
    ("red, blue", "red blue"),       # a mark next to a space is deleted
    ("left-handed", "left handed"),
    ("3.5", "3.5"),                  # a period before a digit is part of a number
    (".5", ".5"),
    ("3.", "3"),                     # a period not followed by a digit goes
    ("\tYes\n", "yes"),
    ("don't", "don't"),              # apostrophes are not in the punctuation list
])
def test_vqa_normalize_follows_official_script(text, expected):
  assert vqa_normalize(text) == expected


@pytest.mark.parametrize("num_matching, expected", [(0, 0.0), (1, 1 / 3), (2, 2 / 3), (3, 1.0), (4, 1.0)])
def test_vqa_accuracy_counts_matching_answers_among_ten(num_matching, expected):
  # Matching answers are spelled differently ("two", "2", "Two.") and must be normalised to count.
  spellings = ["two", "2", "Two.", "the two"]
  answers = spellings[:num_matching] + ["3"] * (10 - num_matching)
  assert vqa_accuracy("Two", answers) == pytest.approx(expected)


def test_vqa_accuracy_normalises_the_prediction():
  assert vqa_accuracy("  A Dog!\n", ["dog", "dog", "dog"]) == 1.0
  assert vqa_accuracy("dont know", ["don't know", "no"]) == pytest.approx(1 / 3)


# ---------------------------------------------------------------------------------------------- ANLS


def test_anls_values():
  assert anls("helo", ["hello"]) == pytest.approx(1 - 1 / 5)        # 1 insertion / max(4, 5)
  assert anls("  HELLO ", ["hello"]) == 1.0                         # lowercased and stripped
  assert anls("kitten", ["sitting"]) == pytest.approx(1 - 3 / 7)    # classic distance 3, longer length 7
  assert anls("abc", ["xyz"]) == 0.0                                # NL = 1 >= 0.5
  assert anls("", [""]) == 1.0                                      # both empty: NL = 0
  assert anls("", ["a"]) == 0.0


def test_anls_keeps_a_similarity_at_the_threshold_as_the_docvqa_script_does():
  # "abcd" -> "abxy": 2 substitutions / 4 = NL 0.5, similarity 0.5: not below 0.5, so kept (the DocVQA
  # evaluation script: `if 1 - min(NL) < threshold: 0`); "ab" -> "ac" likewise. Below the threshold: 0.
  assert anls("abcd", ["abxy"]) == pytest.approx(0.5)
  assert anls("ab", ["ac"]) == pytest.approx(0.5)
  assert anls("abcd", ["axyz"]) == 0.0  # similarity 0.25
  assert anls("abcd", ["abxy"], threshold=0.6) == 0.0  # the threshold is on the similarity


def test_anls_takes_best_answer():
  # "help": 1 substitution / 4 -> 0.75; "hello": 1 insertion / 5 -> 0.8; "xyz": 0.
  assert anls("helo", ["xyz", "help", "hello"]) == pytest.approx(0.8)


# ---------------------------------------------------------------------------------------------- ChartQA


@pytest.mark.parametrize("prediction, answers, expected", [
    ("10.4", ["10"], 1.0),       # |0.4| / 10 = 0.04 <= 0.05
    ("9.6", ["10"], 1.0),
    ("10.5", ["10"], 1.0),       # exactly 0.05: inclusive
    ("10.6", ["10"], 0.0),       # 0.06
    ("45%", ["45"], 1.0),        # trailing % ignored
    ("45", ["45 %"], 1.0),
    ("1,000", ["1000"], 1.0),    # thousands commas
    ("1,030", ["1000"], 1.0),    # 30 / 1000 = 0.03
    ("-5", ["-5.2"], 1.0),       # 0.2 / 5.2 = 0.038
    ("0", ["0"], 1.0),           # zero answer: exact numeric equality required
    ("0.0", ["0"], 1.0),
    ("0.01", ["0"], 0.0),
    ("Yes", [" yes "], 1.0),     # text: case-insensitive after strip
    ("no", ["yes"], 0.0),
    ("ten", ["10"], 0.0),        # a number word is text
    ("1,2", ["12"], 0.0),        # "1,2" is not a well-grouped number, so it is compared as text
    ("12", ["abc", "12.5"], 1.0),  # best answer: 0.5 / 12.5 = 0.04
])
def test_relaxed_accuracy(prediction, answers, expected):
  assert relaxed_accuracy(prediction, answers) == expected


def test_relaxed_accuracy_tolerance_argument():
  assert relaxed_accuracy("11", ["10"]) == 0.0                  # 0.1 > 0.05
  assert relaxed_accuracy("11", ["10"], tolerance=0.1) == 1.0   # 0.1 <= 0.1


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("metric", [exact_match, vqa_accuracy, anls, relaxed_accuracy])
def test_empty_answers_raise(metric):
  with pytest.raises(ValueError, match="at least one reference answer"):
    metric("cat", [])


@pytest.mark.parametrize("metric", [exact_match, vqa_accuracy, anls, relaxed_accuracy])
def test_a_bare_string_answer_is_refused(metric):
  with pytest.raises(TypeError, match="wrap a single answer"):
    metric("cat", "cat")


def test_cider_input_errors():
  with pytest.raises(ValueError, match="at least one reference answer"):
    cider(["a cat", "a dog"], [["a cat"], []])
  with pytest.raises(ValueError, match="one prediction per reference set"):
    cider(["a cat"], [["a cat"], ["a dog"]])
  assert cider([], []) == []


# ---------------------------------------------------------------------------------------------- CIDEr-D


def test_cider_candidate_equal_to_one_of_two_references_and_no_overlap():
  scores = cider(["a cat", "red car"], [["a cat", "a dog"], ["blue bus"]])
  # N = 2 examples. Document frequencies, once per example over its reference set: example 0 has
  # a, cat, dog, "a cat", "a dog" (df 1 each: "a" is in both refs but counts once); example 1 has blue, bus,
  # "blue bus" (df 1). Candidate n-grams that no reference contains (red, car, "red car") have df 0 -> max(1, 0).
  # So every weight is tf * (log 2 - log 1) = w.
  w = math.log(2) - math.log(1)
  # vs "a cat": unigrams {a: w, cat: w} on both sides, bigram {"a cat": w}; no 3/4-grams; lengths 2 = 2.
  uni_same = (w * w + w * w) / (math.sqrt(w * w + w * w) * math.sqrt(w * w + w * w))
  bi_same = (w * w) / (w * w)
  # vs "a dog": only "a" is shared among unigrams, no shared bigram; lengths 2 = 2.
  uni_dog = (w * w) / (math.sqrt(w * w + w * w) * math.sqrt(w * w + w * w))
  expected0 = 10 * ((uni_same + bi_same + 0 + 0) + (uni_dog + 0 + 0 + 0)) / 4 / 2
  assert expected0 == pytest.approx(3.125)  # (2 + 0.5) / 4 / 2 * 10
  # (Counting "a" twice would give it weight log 2 - log 2 = 0 and the score 2.5.)
  assert scores == pytest.approx([expected0, 0.0])


def test_cider_idf_and_length_penalty():
  scores = cider(["a dog", "a cat", "the bird"], [["a dog runs fast"], ["a cat"], ["a bird"]])
  # N = 3. "a" is in every example's references: df 3, weight log 3 - log 3 = 0. Every other n-gram has
  # df 1 or (candidate-only: "the", "the bird") df 0 -> 1, weight w = log 3.
  w = math.log(3) - math.log(1)
  zero = math.log(3) - math.log(3)
  # Example 0, "a dog" vs "a dog runs fast" (2 vs 4 words).
  #   unigrams: cand {a: 0, dog: w}; ref {a: 0, dog: w, runs: w, fast: w}
  #   bigrams:  cand {"a dog": w};   ref {"a dog": w, "dog runs": w, "runs fast": w}
  #   trigrams/4-grams: the candidate has none -> 0.
  uni0 = (zero * zero + w * w) / (math.sqrt(zero ** 2 + w ** 2) * math.sqrt(zero ** 2 + 3 * w ** 2))
  bi0 = (w * w) / (w * math.sqrt(3 * w ** 2))
  penalty0 = math.exp(-(2 - 4) ** 2 / (2 * 6.0 ** 2))
  expected0 = 10 * (uni0 + bi0 + 0 + 0) * penalty0 / 4 / 1
  # Example 1, "a cat" vs "a cat": unigrams {a: 0, cat: w}, bigram {"a cat": w} on both sides.
  uni1 = (zero * zero + w * w) / (math.sqrt(zero ** 2 + w ** 2) * math.sqrt(zero ** 2 + w ** 2))
  bi1 = (w * w) / (w * w)
  expected1 = 10 * (uni1 + bi1 + 0 + 0) / 4 / 1
  # Example 2, "the bird" vs "a bird": cand unigrams {the: w, bird: w}, ref {a: 0, bird: w}; the bigrams
  # "the bird" / "a bird" differ. Clipped dot: min(w, 0) * 0 for "the" + w * w for "bird".
  uni2 = (min(w, 0.0) * 0.0 + w * w) / (math.sqrt(w ** 2 + w ** 2) * math.sqrt(zero ** 2 + w ** 2))
  expected2 = 10 * (uni2 + 0 + 0 + 0) / 4 / 1
  assert [expected0, expected1, expected2] == pytest.approx(
      [10 * (2 / math.sqrt(3)) * math.exp(-4 / 72) / 4, 5.0, 10 / math.sqrt(2) / 4])
  assert scores == pytest.approx([expected0, expected1, expected2])
  assert scores[1] > scores[0] and scores[1] > scores[2]  # the identical candidate scores highest


def test_cider_identical_long_caption_and_clipping():
  scores = cider(["A man rides a horse", "dog dog dog"], [["a man rides a horse"], ["dog"]])
  # N = 2; every reference n-gram has df 1 and the candidate-only ones ("dog dog", "dog dog dog") df 0 -> 1, so
  # every weight is tf * w with w = log 2.
  w = math.log(2) - math.log(1)
  # Example 0 (lowercased, identical to its reference): unigrams {a: 2w, man: w, rides: w, horse: w};
  # bigrams {"a man", "man rides", "rides a", "a horse"}: w each; 3 trigrams and 2 4-grams, w each.
  uni0 = ((2 * w) ** 2 + 3 * w ** 2) / (math.sqrt((2 * w) ** 2 + 3 * w ** 2) ** 2)
  bi0 = (4 * w ** 2) / (math.sqrt(4 * w ** 2) ** 2)
  tri0 = (3 * w ** 2) / (math.sqrt(3 * w ** 2) ** 2)
  four0 = (2 * w ** 2) / (math.sqrt(2 * w ** 2) ** 2)
  expected0 = 10 * (uni0 + bi0 + tri0 + four0) / 4 / 1
  # Example 1, "dog dog dog" vs "dog": cand unigram {dog: 3w} (norm 3w), ref {dog: w}. The clipped dot product
  # is min(3w, w) * w; the reference has no bigrams, so orders 2..4 give 0. Lengths 3 vs 1.
  uni1 = min(3 * w, w) * w / (3 * w * w)
  expected1 = 10 * (uni1 + 0 + 0 + 0) * math.exp(-(3 - 1) ** 2 / (2 * 6.0 ** 2)) / 4 / 1
  assert [expected0, expected1] == pytest.approx([10.0, 10 / 12 * math.exp(-4 / 72)])
  assert scores == pytest.approx([expected0, expected1])


def test_cider_identical_beats_partial_match():
  refs = [["a man riding a horse on a beach", "a person rides a horse"], ["two dogs play in the snow"],
          ["a plate of food on a table"]]
  others = ["two dogs play in the snow", "a plate of food"]
  identical = cider(["a man riding a horse on a beach"] + others, refs)
  partial = cider(["a man riding a bike"] + others, refs)
  assert identical[0] > partial[0] > 0.0
  assert identical[1:] == pytest.approx(partial[1:])  # idf comes from the references only


def test_cider_single_example_corpus_scores_zero():
  # N = 1: df is 0 or 1, so every idf is log 1 - log(max(1, df)) = 0 and all vectors are zero.
  assert cider(["a cat"], [["a cat"]]) == [0.0]
