"""components/metrics.py, the one scorer of distill, train and evaluate, against counts worked out by hand."""
import pytest
import torch

from cachebrew.components.metrics import bio_entities, entity_f1, main_metric, predictions, score


def test_sequence_labels_accuracy_classes_and_majority_rate():
    preds = [0, 1, 1, 0, 2, 1, 0, 0]
    golds = [0, 1, 0, 0, 1, 1, 0, 2]
    # right at positions 0, 1, 3, 5, 6 -> 5 of 8; predicted {0, 1, 2}; gold class 0 is 4 of 8
    assert score(preds, golds) == {"accuracy": 5 / 8, "predicted_classes": 3, "majority_rate": 4 / 8}
    assert score([1, 1, 1], [1, 0, 1]) == {"accuracy": pytest.approx(2 / 3), "predicted_classes": 1,
                                           "majority_rate": pytest.approx(2 / 3)}  # a collapsed model, visible
    assert main_metric(score(preds, golds)) == "accuracy"


def test_entity_f1_worked_example():
    names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    gold = [[1, 2, 0, 3, 4, 0],   # PER(0,2) LOC(3,5)
            [3, 0, 1, 0]]         # LOC(0,1) PER(2,3)
    pred = [[1, 2, 0, 3, 0, 0],   # PER(0,2) right; LOC(3,4) has the wrong end
            [3, 0, 2, 9]]         # LOC(0,1) right; I-PER without B- starts PER(2,3), right; id 9 is unnamed: "O"
    # entities: predicted 4, gold 4, right 3 -> precision 3/4, recall 3/4, F1 3/4
    r = score(pred, gold, names)
    assert r["precision"] == pytest.approx(3 / 4) and r["recall"] == pytest.approx(3 / 4)
    assert r["f1"] == pytest.approx(3 / 4)
    # token accuracy compares ids: first row wrong at index 4, second at 2 (2 vs 1) and 3 (9 vs 0) -> 7 of 10
    assert r["token_accuracy"] == pytest.approx(7 / 10)
    assert main_metric(r) == "f1"
    # precision and recall apart: one extra predicted entity, one gold entity missed
    r = entity_f1([["B-PER", "O", "B-LOC", "B-LOC"]], [["B-PER", "O", "O", "B-ORG"]])
    assert r == {"precision": pytest.approx(1 / 3), "recall": pytest.approx(1 / 2), "f1": pytest.approx(0.4)}
    assert entity_f1([["O"]], [["O"]]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}  # nothing to find


def test_bio_chunks_follow_conlleval():
    assert bio_entities(["B-PER", "I-PER", "I-LOC", "I-LOC", "B-PER", "B-PER"]) == {
        ("PER", 0, 2), ("LOC", 2, 4), ("PER", 4, 5), ("PER", 5, 6)}
    assert bio_entities(["B-PER", "I-PER", "O", "B-LOC", "I-PER", "I-PER"]) == {("PER", 0, 2), ("LOC", 3, 4),
                                                                               ("PER", 4, 6)}
    assert bio_entities(["I-ORG", "I-ORG", "O"]) == {("ORG", 0, 2)}
    assert bio_entities(["O", "O"]) == set()
    r = entity_f1([["B-PER", "I-PER", "O", "B-LOC"]], [["B-PER", "I-PER", "O", "B-ORG"]])
    assert r == {"precision": 0.5, "recall": 0.5, "f1": 0.5}


def test_id2label_keys_may_be_strings():
    """A model config's id2label has string keys after a JSON round trip; the score must not change."""
    pred, gold = [[1, 0]], [[1, 1]]  # X(0,1) predicted; X(0,1) and X(1,2) gold
    expected = {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "token_accuracy": 0.5}
    assert score(pred, gold, ["O", "B-X"]) == expected
    assert score(pred, gold, {"0": "O", "1": "B-X"}) == expected
    assert score(pred, gold, None)["f1"] == 0.0  # no names: every id reads as "O"


def test_predictions_drop_unlabelled_positions():
    logits = torch.tensor([[[0.0, 1.0], [2.0, 0.0], [0.0, 3.0]],
                           [[5.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])
    labels = torch.tensor([[1, -100, 0], [0, 1, -100]])
    assert predictions(logits, labels) == ([[1, 1], [0, 1]], [[1, 0], [0, 1]])
    assert predictions(torch.tensor([[0.2, 0.9], [3.0, -1.0]]), torch.tensor([1, 1])) == ([1, 0], [1, 1])
