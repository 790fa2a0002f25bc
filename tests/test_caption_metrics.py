"""evaluation.caption_metrics: BLEU-1..4 and CIDEr-D of generated captions, as COCO computes them."""
import math

import pytest

import evaluation as ev

ONE_TOKEN_APART = math.exp(-1 / 72)  # CIDEr-D's length penalty for lengths one token apart (sigma 6)


def scores(generated, references):
    """caption_metrics without num_images: {'BLEU-1': .., 'CIDEr-D': ..}, x100."""
    metrics = ev.caption_metrics(generated, references)
    return {name: metrics[f"{name}_x100"] for name in ev.CAPTION_SCORES}


def words(*captions):
    return [caption.split() for caption in captions]


# ---- BLEU ---------------------------------------------------------------------------------------

def test_bleu_of_a_small_corpus_computed_by_hand():
    generated = ["a dog a dog", "the cat sat on the mat"]
    references = [["a dog runs", "the dog runs fast now"], ["the cat sat on the big red mat"]]
    # Candidate n-grams and how many a reference holds (clipped: "a" twice in the candidate, at
    # most once in one reference, earns 1):
    #   n=1: a dog a dog -> a 1, dog 1 = 2 of 4;        the cat sat on the mat -> 6 of 6
    #   n=2: a dog, dog a, a dog -> "a dog" once = 1 of 3; the mat is not in the reference: 4 of 5
    #   n=3: 0 of 2;                                     on the mat is not: 3 of 4
    #   n=4: 0 of 1;                                     sat on the mat is not: 2 of 3
    # Summed over the corpus, then divided: p1 = 8/10, p2 = 5/8, p3 = 3/6, p4 = 2/4.
    p = [8 / 10, 5 / 8, 3 / 6, 2 / 4]
    # Length: c = 4 + 6 = 10. The references of "a dog a dog" have 3 and 5 words, both 1 away:
    # the shorter counts, r = 3 + 8 = 11 > c, so the brevity penalty is exp(1 - 11/10).
    brevity = math.exp(1 - 11 / 10)
    expected = [100 * brevity * math.prod(p[:n]) ** (1 / n) for n in (1, 2, 3, 4)]
    measured = scores(generated, references)
    assert [measured[f"BLEU-{n}"] for n in (1, 2, 3, 4)] == pytest.approx(expected, rel=1e-12)


def test_bleu_reproduces_the_worked_examples_of_papineni_et_al_2002():
    # Section 2.1.1: a candidate that repeats "the" earns a modified unigram precision of 2/7.
    measured = scores(["the the the the the the the."], [["The cat is on the mat.", "There is a cat on the mat."]])
    assert measured["BLEU-1"] == pytest.approx(100 * 2 / 7)
    # Example 1: modified unigram precision 17/18 and 8/14, bigram precision 10/17 and 1/13.
    references = [["It is a guide to action that ensures that the military will forever heed Party commands.",
                   "It is the guiding principle which guarantees the military forces always being under the "
                   "command of the Party.",
                   "It is the practical guide for the army always to heed the directions of the party."]]
    candidate1 = "It is a guide to action which ensures that the military always obeys the commands of the party."
    candidate2 = "It is to insure the troops forever hearing the activity guidebook that party direct."
    measured = scores([candidate1], references)  # 18 words, a reference of 18: no brevity penalty
    assert measured["BLEU-1"] == pytest.approx(100 * 17 / 18)
    assert measured["BLEU-2"] == pytest.approx(100 * math.sqrt(17 / 18 * 10 / 17))
    measured = scores([candidate2], references)  # 14 words, the closest reference has 16
    brevity = math.exp(1 - 16 / 14)
    assert measured["BLEU-1"] == pytest.approx(100 * brevity * 8 / 14)
    assert measured["BLEU-2"] == pytest.approx(100 * brevity * math.sqrt(8 / 14 * 1 / 13))


# ---- CIDEr-D ------------------------------------------------------------------------------------

def test_cider_d_of_a_tiny_corpus_computed_by_hand():
    generated = ["a dog", "a black cat"]
    references = [["a dog", "a black dog"], ["a cat"]]
    # Two images, so idf(g) = log(2 / images whose references hold g): "a" is in both, idf 0;
    # every other n-gram is in one (or none: "black cat", counted as one), idf log 2 = L.
    # Image 0, "a dog" (unigram vector [a 0, dog L], bigram [a-dog L]):
    #   against "a dog": cosine 1 for n = 1 and 2; no 3- or 4-grams, 0 -> mean (1 + 1 + 0 + 0) / 4
    #   against "a black dog" [a 0, black L, dog L]: n=1 cosine L^2 / (L * L sqrt 2) = 1/sqrt 2, no
    #   bigram in common -> mean (1/sqrt 2) / 4, times the length penalty (3 words, not 2).
    image0 = 10 * (2 / 4 + ONE_TOKEN_APART / (4 * math.sqrt(2))) / 2
    # Image 1, "a black cat" [a 0, black L, cat L] against "a cat" [a 0, cat L]: the same 1/sqrt 2.
    image1 = 10 * ONE_TOKEN_APART / (4 * math.sqrt(2))
    assert ev.cider_d(words(*generated), [words(*refs) for refs in references]) == pytest.approx([image0, image1])
    assert scores(generated, references)["CIDEr-D"] == pytest.approx(100 * (image0 + image1) / 2)


def test_cider_d_clips_a_repeated_word():
    references = [words("a dog"), words("a cat")]
    # "dog dog" points where "dog" points, so its plain cosine with "a dog" [a 0, dog L] is 1.
    # Clipped, its 2L counts as L: L * L / (2L * L) = 1/2. (Same length as "a dog": no penalty.)
    assert ev.cider_d(words("dog dog", "a cat"), references)[0] == pytest.approx(10 * (1 / 2) / 4)


def test_cider_d_of_a_single_image_is_zero_because_its_references_are_the_whole_corpus():
    # The idf comes from the references being scored: with one image, each n-gram is in 1 of 1.
    assert scores(["a dog on the beach"], [["a dog on the beach"]])["CIDEr-D"] == 0


def test_the_scores_equal_cocos_evaluation_code():
    # pycocoevalcap 1.2 (its Java PTBTokenizer, Bleu(4) and Cider) gave these, x100, for this corpus.
    generated = ["A man riding a wave on a surfboard.", "Two giraffes standing in a field.",
                 "A stop sign on a street corner.", "A dog sleeping on a couch."]
    references = [["A man riding a wave on top of a surfboard.", "A surfer rides a large wave in the ocean.",
                   "A person on a surfboard riding a wave."],
                  ["Two giraffes standing next to each other in a field.", "A pair of giraffes in a grassy field.",
                   "Two giraffes stand in the grass near trees."],
                  ["A red stop sign on the corner of a street.", "A stop sign in front of a building.",
                   "The stop sign is red and white."],
                  ["The dog's ball isn't on the couch.", "A brown dog lying on a couch.",
                   "The dog is sleeping on the sofa."]]
    coco = {"BLEU-1": 89.48393167480853, "BLEU-2": 79.16211558313464, "BLEU-3": 66.57973775833432,
            "BLEU-4": 47.94025320171754, "CIDEr-D": 256.84628892108844}
    # (COCO's BLEU adds 1e-15 to each count and 1e-9 to each total, against division by zero)
    assert scores(generated, references) == pytest.approx(coco, rel=1e-9)


# ---- edge cases ---------------------------------------------------------------------------------

def test_generating_the_reference_scores_bleu_100_and_cider_d_1000():
    captions = ["a dog runs on the beach", "two cats sleep on a sofa"]
    # CIDEr-D: cosine 1 for every n, no length penalty, times 10, x100
    assert scores(captions, [[caption] for caption in captions]) == pytest.approx(
        {"BLEU-1": 100, "BLEU-2": 100, "BLEU-3": 100, "BLEU-4": 100, "CIDEr-D": 1000})


def test_empty_generated_captions_score_zero():
    # (a caption of punctuation only is empty once tokenized)
    assert scores(["", "."], [["a dog runs"], ["a cat sleeps"]]) == dict.fromkeys(ev.CAPTION_SCORES, 0.0)
    assert ev.cider_d([[], ["a", "cat"]], [words("a dog"), words("a cat")])[0] == 0


def test_inputs_that_do_not_fit_together_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="3 generated captions and 2 lists of references"):
        ev.caption_metrics(["a", "b", "c"], [["a"], ["b"]])
    with pytest.raises(ValueError, match=r"references\[1\] is 'a cat': give each image a list"):
        ev.caption_metrics(["a dog", "a cat"], [["a dog"], "a cat"])
    with pytest.raises(ValueError, match=r"references\[0\] is \[\]"):
        ev.caption_metrics(["a dog"], [[]])
    with pytest.raises(ValueError, match="no captions"):
        ev.caption_metrics([], [])


# ---- tokenization -------------------------------------------------------------------------------

@pytest.mark.parametrize("caption, ptb", [
    # (caption, what COCO's Java PTBTokenizer and punctuation removal made of it)
    ("A man riding a wave on top of a surfboard.", "a man riding a wave on top of a surfboard"),
    ('The dog\'s ball isn\'t red; it\'s "blue" (mostly)!', "the dog 's ball is n't red it 's blue -lrb- mostly -rrb-"),
    ("Two people, a man and a woman, stand near a T-shirt stand...", "two people a man and a woman stand near a "
                                                                     "t-shirt stand"),
    ("She can't and won't, cannot do it.", "she ca n't and wo n't can not do it"),
    ("The dogs' bowls are on the black/white mat.", "the dogs bowls are on the black/white mat"),
    ("He said 'hello' to the U.S. president at 5:30 p.m.", "he said hello to the u.s. president at 5:30 p.m."),
    ("A 3.5 inch phone costs $200, 50% off", "a 3.5 inch phone costs $ 200 50 % off"),
    ("“Quoted” text — with a dash… The dog’s toy", "quoted text with a dash the dog 's toy"),
])
def test_captions_are_tokenized_as_cocos_ptb_tokenizer_does(caption, ptb):
    assert " ".join(ev.caption_tokens(caption)) == ptb


def test_chinese_captions_are_scored_character_by_character():
    assert ev.caption_tokens("一只狗在草地上奔跑。") == list("一只狗在草地上奔跑")
    assert ev.caption_tokens("2只Dog，在跑！") == ["2", "只", "dog", "在", "跑"]
    # 9 characters against 8: unigrams 8 of 9 (not 奔), bigrams 6 of 8 (not 上奔, 奔跑); c > r.
    # As whole sentences without spaces they would be one word each, and BLEU 0.
    measured = scores(["一只狗在草地上奔跑。"], [["一只狗在草地上跑。"]])
    assert measured["BLEU-1"] == pytest.approx(100 * 8 / 9)
    assert measured["BLEU-2"] == pytest.approx(100 * math.sqrt(8 / 9 * 6 / 8))


# ---- output -------------------------------------------------------------------------------------

def test_format_results_prints_the_captioning_scores_beside_retrieval():
    results = {"retrieval": {"image_to_text": {"R@1": 50.0, "R@5": 75.0, "R@10": 100.0, "mean_rank": 2.0,
                                               "median_rank": 1.5},
                             "text_to_image": {"R@1": 25.0, "R@5": 50.0, "R@10": 100.0, "mean_rank": 3.0,
                                               "median_rank": 2.5},
                             "rsum": 400.0, "mean_recall": 66.67},
               "num_images": 4, "num_texts": 8,
               "captioning": {"BLEU-1_x100": 71.234, "BLEU-2_x100": 52.1, "BLEU-3_x100": 38.0,
                              "BLEU-4_x100": 27.5, "CIDEr-D_x100": 104.25, "num_images": 4}}
    lines = ev.format_results(results).splitlines()
    assert lines[0].startswith("Retrieval: 4 images, 8 captions")
    assert lines[-2] == "Captioning: 4 generated captions against their references (x100, as papers print them)"
    assert lines[-1] == "  BLEU-1 71.23  BLEU-2 52.10  BLEU-3 38.00  BLEU-4 27.50  CIDEr-D 104.25"
    assert "Captioning" not in ev.format_results({k: v for k, v in results.items() if k != "captioning"})
