"""Offline text metrics for generated reports and VQA answers: BLEU-1/4, ROUGE-1/L, METEOR, closed-VQA accuracy.

All are computed here from their published definitions, so evaluation needs no downloads:
- BLEU (Papineni et al. 2002): corpus-level clipped n-gram precisions, geometric mean, brevity penalty.
- ROUGE-1 / ROUGE-L (Lin 2004): per-pair unigram-overlap / longest-common-subsequence F1, averaged.
- METEOR (Banerjee & Lavie 2005, NLTK's parameters alpha=0.9, beta=3, gamma=0.5): exact matches, then
  matches of suffix-stripped stems; WordNet synonyms are left out (no downloads), so scores can be a
  little lower than NLTK's on texts that rely on synonyms.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

_WORD = re.compile(r"[a-z0-9]+(?:\.[0-9]+)?")


def tokenize(text: str) -> list[str]:
    """Lower-cased words and numbers (decimals kept whole); punctuation dropped."""
    return _WORD.findall((text or "").lower())


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(references: Sequence[str], hypotheses: Sequence[str], max_n: int = 4) -> float:
    """Corpus BLEU-N with uniform weights (one reference per hypothesis); 0 when any precision is 0."""
    _check_pairs(references, hypotheses)
    matched = [0] * max_n
    total = [0] * max_n
    ref_len = hyp_len = 0
    for ref, hyp in zip(references, hypotheses):
        r, h = tokenize(ref), tokenize(hyp)
        ref_len += len(r)
        hyp_len += len(h)
        for n in range(1, max_n + 1):
            hyp_ngrams, ref_ngrams = _ngrams(h, n), _ngrams(r, n)
            matched[n - 1] += sum(min(c, ref_ngrams[g]) for g, c in hyp_ngrams.items())
            total[n - 1] += max(len(h) - n + 1, 0)
    if hyp_len == 0 or any(m == 0 for m in matched):
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matched, total)) / max_n
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return brevity * math.exp(log_precision)


def _f1(p: float, r: float) -> float:
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def rouge_1(reference: str, hypothesis: str) -> float:
    r, h = Counter(tokenize(reference)), Counter(tokenize(hypothesis))
    if not r or not h:
        return 0.0
    overlap = sum((r & h).values())
    return _f1(overlap / sum(h.values()), overlap / sum(r.values()))


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(reference: str, hypothesis: str) -> float:
    r, h = tokenize(reference), tokenize(hypothesis)
    if not r or not h:
        return 0.0
    lcs = _lcs(r, h)
    return _f1(lcs / len(h), lcs / len(r))


_SUFFIXES = (("ations", "ate"), ("ation", "ate"), ("ies", "y"), ("ings", ""), ("ing", ""), ("edly", ""),
             ("ed", ""), ("ly", ""))


def stem(word: str) -> str:
    """A light suffix stripper (plurals, -ing, -ed, -ly, -ation, final e): enough to match inflections."""
    if len(word) <= 3:
        return word
    for suffix, replacement in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)] + replacement
            break
    else:
        if word.endswith(("sses", "shes", "ches", "xes", "zes")):
            word = word[:-2]
        elif word.endswith("s") and not word.endswith(("ss", "us", "is")):
            word = word[:-1]
    return word.rstrip("e") if len(word) > 3 else word


def meteor(reference: str, hypothesis: str, alpha: float = 0.9, beta: float = 3.0, gamma: float = 0.5) -> float:
    r, h = tokenize(reference), tokenize(hypothesis)
    if not r or not h:
        return 0.0
    alignment: dict[int, int] = {}  # hypothesis index -> reference index
    for key in (lambda w: w, stem):
        used = set(alignment.values())
        for i, word in enumerate(h):
            if i in alignment:
                continue
            for j, ref_word in enumerate(r):
                if j not in used and key(word) == key(ref_word):
                    alignment[i] = j
                    used.add(j)
                    break
    m = len(alignment)
    if m == 0:
        return 0.0
    pairs = sorted(alignment.items())
    # A chunk is a run of matches adjacent in both texts.
    chunks = 1 + sum(1 for (i0, j0), (i1, j1) in zip(pairs, pairs[1:]) if not (i1 == i0 + 1 and j1 == j0 + 1))
    precision, recall = m / len(h), m / len(r)
    fmean = precision * recall / (alpha * precision + (1 - alpha) * recall)
    return fmean * (1 - gamma * (chunks / m) ** beta)


def _check_pairs(references: Sequence[str], hypotheses: Sequence[str]) -> None:
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")


def text_metrics(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
    """BLEU-1/4 (corpus) and mean ROUGE-1/L and METEOR over the pairs."""
    _check_pairs(references, hypotheses)
    n = max(len(references), 1)
    return {
        "bleu1": corpus_bleu(references, hypotheses, 1),
        "bleu4": corpus_bleu(references, hypotheses, 4),
        "rouge1": sum(map(rouge_1, references, hypotheses)) / n,
        "rougeL": sum(map(rouge_l, references, hypotheses)) / n,
        "meteor": sum(map(meteor, references, hypotheses)) / n,
        "n": len(references),
    }


_CHOICE = re.compile(r"^\s*\(?([A-Da-d])\s*[\.\):]")


def closed_answer_correct(prediction: str, answer_letter: str, options: dict[str, str]) -> bool:
    """A closed answer is right when its leading letter ("B." / "(B)") is the answer's, or, with no letter,
    when it names the right option's text and no other option's."""
    m = _CHOICE.match(prediction or "")
    if m:
        return m.group(1).upper() == answer_letter.upper()
    text = (prediction or "").lower()
    named = {k for k, v in options.items() if v and str(v).lower() in text}
    return named == {answer_letter.upper()}


def closed_vqa_accuracy(records: Iterable[dict]) -> dict:
    """records: {"question_type", "answer_choice", "options": {"A":..}, "prediction"} -> overall and per type."""
    per_type: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for rec in records:
        ok = closed_answer_correct(rec["prediction"], rec["answer_choice"], rec["options"])
        per_type[str(rec["question_type"])][0] += int(ok)
        per_type[str(rec["question_type"])][1] += 1
    right = sum(v[0] for v in per_type.values())
    total = sum(v[1] for v in per_type.values())
    return {
        "accuracy": right / total if total else 0.0,
        "n": total,
        "per_type": {k: {"accuracy": v[0] / v[1], "n": v[1]} for k, v in sorted(per_type.items())},
    }
