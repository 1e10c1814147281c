"""Text metrics for batch evaluation of VQA and captioning models: exact match, VQAv2 accuracy, DocVQA ANLS,
ChartQA relaxed accuracy and COCO CIDEr-D.

Every per-example metric takes the prediction and ALL reference answers of the example (a list; a single
answer is a list of one), because most benchmarks score against several annotators and a metric fed only the
first answer silently under-reports. CIDEr is a corpus metric: its idf weights come from the reference sets of
the whole evaluated corpus, so it scores all examples at once and returns per-example values (corpus score =
their mean). Pure Python; no dependencies, no network.
"""
import collections
import math
import re


def _check_answers(answers) -> None:
  """Fails loudly on the two ways callers get the answers argument wrong: a bare string (which would be
  iterated character by character and score against single letters) and an empty list (no score exists)."""
  if isinstance(answers, str):
    raise TypeError(f"answers must be a list of reference strings, got the string {answers!r}; "
                    "wrap a single answer as [answer].")
  if len(answers) == 0:
    raise ValueError("answers is empty: every example needs at least one reference answer.")


# ---------------------------------------------------------------------------------------------- exact match


def normalize(text: str) -> str:
  """Lowercases, strips and collapses runs of whitespace, so that formatting noise of a decoder (a trailing
  newline, double spaces, capitalisation) does not count as a wrong answer."""
  return " ".join(text.lower().split())


def exact_match(prediction: str, answers: list[str]) -> float:
  """1.0 if the normalised prediction equals the normalised form of any reference answer, else 0.0."""
  _check_answers(answers)
  pred = normalize(prediction)
  return float(any(pred == normalize(a) for a in answers))


# ---------------------------------------------------------------------------------------------- VQAv2

# The tables and regular expressions below are those of the official VQA evaluation script
# (GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py), quirks included, so that scores are
# comparable with published VQAv2 numbers: the capitalised keys ("Im", "Ive", "Id've") can never match because
# words are lowercased first, and "somebody'd" maps to "somebodyd" (the reverse of the other entries).
_VQA_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
# "none" -> "0" is in the official table too (so "none" and "0" are the same answer to a counting question).
_VQA_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                     "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_VQA_ARTICLES = frozenset(["a", "an", "the"])
_VQA_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
              "?", "!"]
# Official pattern verbatim: "(?!<=\d)" is a (mistyped) lookahead that never fires before a ".", so in effect
# every period that is not followed by a digit is removed: "3.5" and ".5" keep theirs, "dog." and "3." lose it.
_VQA_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_VQA_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# The official script passes re.UNICODE (== 32) as the positional `count` of re.sub, so it removes at most 32
# periods; kept for fidelity (it only matters for answers with more than 32 periods).
_VQA_PERIOD_COUNT = int(re.UNICODE)


def _vqa_process_punctuation(text: str) -> str:
  """The official processPunctuation: a punctuation mark next to a space, or any mark at all in a text that
  contains a digit-comma-digit group ("1,000"), is deleted; otherwise it becomes a space ("left-handed" ->
  "left handed"). Decisions look at the input text, not the partly processed one, as the official code does."""
  out = text
  has_number_comma = _VQA_COMMA_STRIP.search(text) is not None
  for p in _VQA_PUNCT:
    if p + " " in text or " " + p in text or has_number_comma:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return _VQA_PERIOD_STRIP.sub("", out, count=_VQA_PERIOD_COUNT)


def _vqa_process_digit_article(text: str) -> str:
  """The official processDigitArticle: lowercase words, number words -> digits, drop articles, then expand
  apostrophe-less contractions ("dont" -> "don't")."""
  words = [_VQA_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
  words = [w for w in words if w not in _VQA_ARTICLES]
  return " ".join(_VQA_CONTRACTIONS.get(w, w) for w in words)


def vqa_normalize(text: str) -> str:
  """VQAv2 answer normalisation of the official evaluation script: newlines and tabs -> spaces, strip,
  punctuation rules, then digits/articles/contractions. E.g. "Two" -> "2", "the dog." -> "dog", "1,000" ->
  "1000", "3.5" -> "3.5", "dont" -> "don't"."""
  text = text.replace("\n", " ").replace("\t", " ").strip()
  return _vqa_process_digit_article(_vqa_process_punctuation(text))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
  """VQA accuracy in its simple form: min(#answers equal to the prediction / 3, 1), comparing the
  vqa_normalize'd prediction with each vqa_normalize'd reference answer (duplicates count each time).

  This is NOT bit-identical to the official VQAv2 number, which (a) averages min(#matches / 3, 1) over the 10
  leave-one-out subsets of 9 of the 10 human answers -- with m matches among 10 that gives 0.3 / 0.6 / 0.9 for
  m = 1 / 2 / 3 where this form gives 1/3, 2/3, 1, and the same for m = 0 or m >= 4 -- and (b) normalises
  prediction and answers only when the annotators disagree, comparing the merely stripped strings when all
  answers are identical. The simple form is what most VLM evaluation code reports.
  """
  _check_answers(answers)
  pred = vqa_normalize(prediction)
  matches = sum(vqa_normalize(a) == pred for a in answers)
  return min(matches / 3.0, 1.0)


# ---------------------------------------------------------------------------------------------- ANLS


def _edit_distance(a: str, b: str) -> int:
  """Levenshtein distance (unit-cost insert, delete, substitute), two-row dynamic programme."""
  if len(a) < len(b):
    a, b = b, a
  prev = list(range(len(b) + 1))
  for i, ca in enumerate(a, 1):
    cur = [i]
    for j, cb in enumerate(b, 1):
      cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
    prev = cur
  return prev[-1]


def anls(prediction: str, answers: list[str], threshold: float = 0.5) -> float:
  """DocVQA Average Normalized Levenshtein Similarity for one question, as the DocVQA evaluation script scores it:
  the similarity 1 - NL to the closest answer, 0 if it is below `threshold`, where NL = edit_distance /
  max(len(prediction), len(answer)) on lowercased, stripped, whitespace-collapsed strings. The threshold keeps
  OCR-level slips ("helo") partly correct while a wrong answer that happens to share letters scores 0. At
  exactly the threshold the script keeps the score (the paper's "NL < 0.5" would not): published numbers come
  from the script. Two empty strings are a perfect match (NL = 0)."""
  _check_answers(answers)
  pred = normalize(prediction)
  best = 0.0
  for answer in answers:
    ans = normalize(answer)
    longest = max(len(pred), len(ans))
    best = max(best, 1.0 - (_edit_distance(pred, ans) / longest if longest else 0.0))
  return best if best >= threshold else 0.0


# ---------------------------------------------------------------------------------------------- ChartQA

# A decimal number with optional sign, correctly grouped thousands commas ("1,234,567.8") and exponent; a
# trailing "%" is removed before matching. Strict grouping keeps "1,2" (a list) from reading as 12.
_NUMBER = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+(?:\.\d*)?|\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def _parse_number(text: str) -> float | None:
  """The value of a numeric answer, or None for text. A trailing '%' is dropped without dividing by 100,
  because ChartQA gold answers usually omit the sign that models print ("45%" vs "45")."""
  s = text.strip()
  if s.endswith("%"):
    s = s[:-1].rstrip()
  if not _NUMBER.fullmatch(s):
    return None
  return float(s.replace(",", ""))


def relaxed_accuracy(prediction: str, answers: list[str], tolerance: float = 0.05) -> float:
  """ChartQA relaxed accuracy: a numeric prediction is correct within a relative `tolerance` of a numeric
  answer (|pred - ans| / |ans| <= tolerance; exactly 0 when the answer is 0), since values read off a chart are
  approximate; anything else must match case-insensitively after stripping. Best over the answers."""
  _check_answers(answers)
  pred_num = _parse_number(prediction)
  for answer in answers:
    ans_num = _parse_number(answer)
    if pred_num is not None and ans_num is not None:
      ok = pred_num == 0.0 if ans_num == 0.0 else abs(pred_num - ans_num) / abs(ans_num) <= tolerance
    else:
      ok = prediction.strip().lower() == answer.strip().lower()
    if ok:
      return 1.0
  return 0.0


# ---------------------------------------------------------------------------------------------- CIDEr-D

_CIDER_N = 4
_CIDER_SIGMA = 6.0


def _ngrams(text: str, n: int = _CIDER_N) -> collections.Counter:
  """Counts of all 1..n-grams (as word tuples) of the lowercased whitespace-split text."""
  words = text.lower().split()
  return collections.Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def _tfidf(counts: collections.Counter, doc_freq: collections.Counter, log_num_docs: float):
  """Per n-gram order: the {ngram: tf * idf} vector and its L2 norm, idf = log(N) - log(max(1, df)). An
  n-gram no reference set contains gets df 1, i.e. the highest weight, as in the reference code."""
  vecs = [{} for _ in range(_CIDER_N)]
  for ngram, tf in counts.items():
    vecs[len(ngram) - 1][ngram] = tf * (log_num_docs - math.log(max(1.0, doc_freq[ngram])))
  norms = [math.sqrt(sum(v * v for v in vec.values())) for vec in vecs]
  return vecs, norms


def _cider_sim(cand, ref, cand_len: int, ref_len: int) -> list[float]:
  """Per n: clipped cosine similarity of the candidate and one reference, times the gaussian length penalty.
  Clipping (min of the two weights) stops a candidate from scoring by repeating a reference n-gram."""
  (cvecs, cnorms), (rvecs, rnorms) = cand, ref
  penalty = math.exp(-((cand_len - ref_len) ** 2) / (2 * _CIDER_SIGMA ** 2))
  out = []
  for cvec, cnorm, rvec, rnorm in zip(cvecs, cnorms, rvecs, rnorms):
    val = sum(min(w, rvec.get(g, 0.0)) * rvec.get(g, 0.0) for g, w in cvec.items())
    if cnorm != 0 and rnorm != 0:
      val /= cnorm * rnorm
    out.append(val * penalty)
  return out


def cider(predictions: list[str], references: list[list[str]]) -> list[float]:
  """CIDEr-D per example, as pycocoevalcap/cider/cider_scorer.py computes it (n = 1..4, sigma = 6, clipping,
  x10); the corpus score is the mean of the returned list.

  idf comes from the references of THIS corpus (an n-gram counts once per example whose reference set
  contains it; log N with N = number of examples), so scores depend on the whole batch and are only comparable
  across runs on the same examples; a corpus of one example always scores 0 (every idf is log 1 - log 1).
  Tokens are the whitespace-split lowercased text: run any PTB tokenisation / punctuation removal of the COCO
  toolkit before calling this to reproduce leaderboard numbers.
  """
  if isinstance(predictions, str) or len(predictions) != len(references):
    raise ValueError(f"cider needs one prediction per reference set; got {len(predictions)} predictions for "
                     f"{len(references)} reference sets.")
  for refs in references:
    _check_answers(refs)
  if not predictions:
    return []
  cand_counts = [_ngrams(p) for p in predictions]
  ref_counts = [[_ngrams(r) for r in refs] for refs in references]
  doc_freq = collections.Counter(g for refs in ref_counts for g in set().union(*refs))
  log_n = math.log(float(len(references)))
  # Lengths are word counts. The reference code counts bigrams (words - 1, floored at 0) instead; the two differ
  # only when a side is empty, and an empty side has an all-zero vector, so the scores are identical.
  scores = []
  for pred, cand, ref_texts, refs in zip(predictions, cand_counts, references, ref_counts):
    cand_vec, cand_len = _tfidf(cand, doc_freq, log_n), len(pred.split())
    per_n = [0.0] * _CIDER_N
    for ref_text, ref in zip(ref_texts, refs):
      sim = _cider_sim(cand_vec, _tfidf(ref, doc_freq, log_n), cand_len, len(ref_text.split()))
      per_n = [a + b for a, b in zip(per_n, sim)]
    scores.append(10.0 * (sum(per_n) / _CIDER_N) / len(refs))
  return scores


PER_EXAMPLE = {"exact_match": exact_match, "vqa_accuracy": vqa_accuracy, "anls": anls,
               "relaxed_accuracy": relaxed_accuracy}
CORPUS = {"cider": cider}
