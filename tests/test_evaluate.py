from vlsi.run.evaluate import is_correct, normalize, options, summarize

MC = "What is missing?\nA. red circle\nB. blue square\nC. green cross\nAnswer with the letter."


def test_normalize_ignores_case_punctuation_articles_and_spacing():
    assert normalize("  The Red  circle. ") == "red circle"


def test_exact_match_after_normalization():
    assert is_correct("Red circle.", "red circle")
    assert not is_correct("red", "red circle")
    assert not is_correct("", "no")


def test_multiple_choice_letters_and_option_text():
    assert options(MC) == {"A": "red circle", "B": "blue square", "C": "green cross"}
    assert is_correct("B", "B", MC)
    assert is_correct("(B) blue square", "B", MC)
    assert is_correct("B.", "B", MC)
    assert is_correct("blue square", "B", MC)
    assert not is_correct("A", "B", MC)
    assert not is_correct("green cross", "B", MC)
    # A leading article is not an option letter.
    mc_a = "Which?\nA. red circle\nB. a blue square"
    assert not is_correct("A blue square", "A", mc_a)
    assert is_correct("A blue square", "B", mc_a)


def test_summary_has_per_skill_accuracy_and_majority_chance():
    rows = [
        {"skill": "count", "reference": "two", "correct": True},
        {"skill": "count", "reference": "two", "correct": False},
        {"skill": "count", "reference": "one", "correct": False},
        {"skill": "spatial", "reference": "yes", "correct": True},
    ]
    m = summarize(rows, {"skipped": 1})
    assert m["accuracy"] == 0.5 and m["n"] == 4 and m["skipped"] == 1
    assert m["per_skill"]["count"]["accuracy"] == 1 / 3
    assert m["per_skill"]["count"]["chance"] == 2 / 3
    assert m["per_skill"]["spatial"]["n"] == 1


def test_number_scoring_reads_the_last_number_of_phrased_or_worked_answers():
    assert is_correct("The sum is 20.", "20", score="number")
    assert is_correct("4 + 7 + 9 = 20", "They add up to 20.", score="number")
    assert not is_correct("4 + 7 + 9 = 21", "20", score="number")
    assert not is_correct("20 or 21", "20", score="number")
    assert not is_correct("twenty", "20", score="number")
    # Exact scoring keeps refusing the phrased answer.
    assert not is_correct("The sum is 20.", "20")


def test_number_scoring_chance_level_groups_answers_by_their_number():
    rows = [
        {"skill": "sum", "reference": "The sum is 5.", "correct": True},
        {"skill": "sum", "reference": "5", "correct": False},
        {"skill": "sum", "reference": "7", "correct": False},
    ]
    assert summarize(rows, {}, score="number")["per_skill"]["sum"]["chance"] == 2 / 3
    assert summarize(rows, {})["per_skill"]["sum"]["chance"] == 1 / 3
