"""Report metrics against values computed by hand from the published definitions."""

from __future__ import annotations

import json
import math

import pytest

from voxsearch.encoders.finding_text import FindingMatcher
from voxsearch.reports.findings import finding_scores, truth_of
from voxsearch.reports.metrics import (
    closed_answer_correct,
    closed_vqa_accuracy,
    corpus_bleu,
    meteor,
    rouge_1,
    rouge_l,
    text_metrics,
    tokenize,
)
from voxsearch.reports.vqa import FindingVocabulary


def test_tokenize_keeps_decimals_and_drops_punctuation():
    assert tokenize("A 12.5 mm Nodule, right lung.") == ["a", "12.5", "mm", "nodule", "right", "lung"]


def test_bleu_by_hand():
    ref, hyp = "the cat sat on the mat", "the cat sat on mat"
    # unigrams 5/5; bigrams: the cat, cat sat, sat on match, "on mat" does not -> 3/4;
    # trigrams 2/3; 4-grams 1/2. Brevity: c=5 < r=6 -> exp(1 - 6/5).
    bp = math.exp(1 - 6 / 5)
    assert corpus_bleu([ref], [hyp], 1) == pytest.approx(bp * 1.0)
    expected4 = bp * math.exp((math.log(1) + math.log(3 / 4) + math.log(2 / 3) + math.log(1 / 2)) / 4)
    assert corpus_bleu([ref], [hyp], 4) == pytest.approx(expected4)


def test_bleu_clips_repeated_words_and_is_zero_without_4gram_match():
    # "the the the" against "the cat": one "the" may match -> p1 = 1/3; c=3 > r=2 so no brevity penalty.
    assert corpus_bleu(["the cat"], ["the the the"], 1) == pytest.approx(1 / 3)
    assert corpus_bleu(["a b c d"], ["a b c e"], 4) == 0.0


def test_rouge_by_hand():
    ref, hyp = "a b c d", "a c e"
    # overlap 2: P = 2/3, R = 2/4 -> F1 = 4/7; LCS "a c" = 2 as well.
    assert rouge_1(ref, hyp) == pytest.approx(4 / 7)
    assert rouge_l(ref, hyp) == pytest.approx(4 / 7)
    # Order matters for ROUGE-L only: LCS of "d c b a" with "a b c d" is 1.
    assert rouge_1(ref, "d c b a") == pytest.approx(1.0)
    assert rouge_l(ref, "d c b a") == pytest.approx(0.25)


def test_meteor_by_hand():
    # Identical 4-word texts: P = R = 1, one chunk -> penalty 0.5 * (1/4)^3.
    assert meteor("a b c d", "a b c d") == pytest.approx(1 - 0.5 * (1 / 4) ** 3)
    # Reversed: 4 matches in 4 chunks -> penalty 0.5; Fmean 1.
    assert meteor("a b c d", "d c b a") == pytest.approx(0.5)
    # Stem stage: "nodules" matches "nodule"; "lung" exact. m = 2, P = 2/2, R = 2/3, chunks 1.
    p, r = 1.0, 2 / 3
    fmean = p * r / (0.9 * p + 0.1 * r)
    assert meteor("nodule lung x", "nodules lung") == pytest.approx(fmean * (1 - 0.5 * (1 / 2) ** 3))


def test_text_metrics_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="2 references but 1"):
        text_metrics(["a", "b"], ["a"])


def test_closed_answers():
    options = {"A": "liver", "B": "lung", "C": "kidney", "D": "spleen"}
    assert closed_answer_correct("B. lung", "B", options)
    assert closed_answer_correct("(b) lung", "B", options)
    assert not closed_answer_correct("A. liver", "B", options)
    assert closed_answer_correct("the lung", "B", options)
    assert not closed_answer_correct("lung or liver", "B", options)  # names two options
    result = closed_vqa_accuracy([
        {"question_type": "organ", "answer_choice": "B", "options": options, "prediction": "B. lung"},
        {"question_type": "organ", "answer_choice": "A", "options": options, "prediction": "C. kidney"},
        {"question_type": "phase", "answer_choice": "A", "options": options, "prediction": "A."},
    ])
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert result["per_type"]["organ"] == {"accuracy": 0.5, "n": 2}
    assert result["per_type"]["phase"] == {"accuracy": 1.0, "n": 1}


def _row(findings):
    return {"series_id": "s", "findings": json.dumps(findings)}


def test_finding_extraction_counts_negations_as_absent():
    rows = [_row([{"type": "nodule", "organ": "lung"}]), _row([{"type": "cyst", "organ": "liver"}])]
    matcher = FindingMatcher.from_vocabulary(FindingVocabulary.from_rows(rows))
    assert matcher.extract("A 12 mm nodule in the right lung.") == {("nodule", "lung")}
    assert matcher.extract("Two nodules are seen in the lungs.") == {("nodule", "lung")}
    assert matcher.extract("No nodule in the lung.") == set()
    assert matcher.extract("The lung is clear without nodules.") == set()
    assert matcher.extract("A liver cyst is not seen.") == set()
    assert matcher.extract("No lung nodule, but a cyst in the liver.") == {("cyst", "liver")}


def test_finding_scores_by_hand():
    rows = [_row([{"type": "nodule", "organ": "lung"}, {"type": "cyst", "organ": "liver"}]),
            _row([]), _row([{"type": "cyst", "organ": "kidney"}])]
    matcher = FindingMatcher.from_vocabulary(FindingVocabulary.from_rows(rows))
    truths = [truth_of(r) for r in rows]
    texts = [
        "Lung nodule. No liver cyst.",  # TP nodule, FN cyst (negated)
        "A cyst in the liver.",  # FP on a normal study
        "Kidney cyst.",  # TP
    ]
    s = finding_scores(truths, texts, matcher)
    assert (s["all"]["tp"], s["all"]["fp"], s["all"]["fn"]) == (2, 1, 1)
    assert s["all"]["f1"] == pytest.approx(2 / 3)
    # Abnormal studies only: TP 2, FP 0, FN 1 -> P 1, R 2/3, F1 0.8.
    assert s["abnormal"]["f1"] == pytest.approx(0.8)
    assert s["abnormal"]["n"] == 2
    assert s["normal_specificity"] == 0.0


def test_paired_bootstrap_brackets_the_f1_difference():
    from voxsearch.reports.findings import paired_f1_bootstrap

    rows = [_row([{"type": "nodule", "organ": "lung"}]), _row([{"type": "cyst", "organ": "kidney"}]), _row([])] * 20
    matcher = FindingMatcher.from_vocabulary(FindingVocabulary.from_rows(rows))
    truths = [truth_of(r) for r in rows]
    right = ["Lung nodule.", "Kidney cyst.", "No acute abnormality."] * 20
    wrong = ["Kidney cyst.", "Lung nodule.", "Lung nodule."] * 20
    better = paired_f1_bootstrap(truths, right, wrong, matcher, resamples=500)
    # Every study favours `right`: F1 1.0 against 0.0, on every resample.
    assert better["all"]["f1_diff"] == pytest.approx(1.0)
    assert better["all"]["ci95"] == [pytest.approx(1.0), pytest.approx(1.0)]
    assert better["all"]["p_a_not_better"] == 0.0 and better["abnormal"]["studies"] == 40
    # The same texts on both sides: the difference is exactly zero, never "better".
    same = paired_f1_bootstrap(truths, right, right, matcher, resamples=200)
    assert same["all"]["ci95"] == [0.0, 0.0] and same["all"]["p_a_not_better"] == 1.0
    # Half right, half wrong: the interval straddles the observed difference and is not a point.
    mixed = right[:30] + wrong[30:]
    half = paired_f1_bootstrap(truths, mixed, wrong, matcher, resamples=500, seed=1)
    lo, hi = half["all"]["ci95"]
    assert lo < half["all"]["f1_diff"] < hi and hi - lo > 0.1
    with pytest.raises(ValueError, match="ground-truth sets"):
        paired_f1_bootstrap(truths, right[:-1], wrong, matcher)


def test_stem_matches_inflections():
    from voxsearch.reports.metrics import stem

    assert stem("nodules") == stem("nodule")
    assert stem("masses") == stem("mass") == "mass"
    assert stem("cysts") == stem("cyst")
    assert stem("enhancing") == stem("enhanced")


def test_finding_matcher_reads_synthetic_archive_wording():
    rows = [_row([{"type": t, "organ": o}]) for t, o in
            [("metastasis", "liver"), ("stone", "kidney"), ("hemorrhage", "brain"), ("nodule", "lung"),
             ("cyst", "kidney"), ("mass", "kidney")]]
    matcher = FindingMatcher.from_vocabulary(FindingVocabulary.from_rows(rows))
    assert matcher.extract("The hepatic parenchyma shows three metastases, up to 2.1 cm.") == {("metastasis", "liver")}
    assert matcher.extract("The right-sided renal parenchyma contains a calcified stone of 12mm.") == {
        ("stone", "kidney")}
    assert matcher.extract("Haemorrhage in the left cerebral hemisphere, measuring up to 20 mm.") == {
        ("hemorrhage", "brain")}
    assert matcher.extract("A 1.2 cm pulmonary nodule is seen in the right lung.") == {("nodule", "lung")}
    assert matcher.extract("No renal mass, cyst or stone. The lungs are clear.") == set()
