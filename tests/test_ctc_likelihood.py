"""The dense OCR reward's CTC likelihood (`lit_ovis.scoring.ctc`): against a brute-force sum over every
alignment, against torch's CTC loss, and by hand for case merging and repeated characters."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from lit_ovis.scoring.ctc import ctc_log_likelihood, label_columns, per_character_likelihood


def collapse(path: tuple[int, ...], blank: int = 0) -> tuple[int, ...]:
    """CTC's many-to-one map: merge repeats, then drop blanks."""
    merged = [c for i, c in enumerate(path) if i == 0 or c != path[i - 1]]
    return tuple(c for c in merged if c != blank)


def brute_force(probs: np.ndarray, labels: tuple[int, ...]) -> float:
    frames, classes = probs.shape
    total = sum(math.prod(probs[t, c] for t, c in enumerate(path))
                for path in itertools.product(range(classes), repeat=frames) if collapse(path) == labels)
    return total


def random_probs(frames: int, classes: int, seed: int) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(size=(frames, classes))
    return np.exp(logits) / np.exp(logits).sum(1, keepdims=True)


@pytest.mark.parametrize("labels", [(1,), (1, 2), (2, 2), (1, 2, 1), (3, 3, 3)])
def test_forward_algorithm_equals_the_sum_over_every_alignment(labels):
    probs = random_probs(6, 4, seed=len(labels) * 7 + labels[0])
    got = ctc_log_likelihood(probs, [[c] for c in labels])
    assert math.exp(got) == pytest.approx(brute_force(probs, labels), rel=1e-9)


def test_matches_torch_ctc_loss_on_longer_sequences():
    rng = np.random.default_rng(0)
    for seed in range(5):
        probs = random_probs(40, 30, seed)
        labels = rng.integers(1, 30, size=int(rng.integers(1, 12))).tolist()
        reference = torch.nn.functional.ctc_loss(
            torch.from_numpy(np.log(probs))[:, None], torch.tensor([labels]), torch.tensor([40]),
            torch.tensor([len(labels)]), blank=0, reduction="none").item()
        assert -ctc_log_likelihood(probs, [[c] for c in labels]) == pytest.approx(reference, rel=1e-6)


def test_by_hand_two_frames():
    # frames (blank, a, b): target "a" over 2 frames = aa + a_ + _a
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    assert math.exp(ctc_log_likelihood(probs, [[1]])) == pytest.approx(0.3 * 0.6 + 0.3 * 0.1 + 0.5 * 0.6)
    # "aa" needs a blank between the repeats: 3 frames at least, so 2 frames give probability 0
    assert ctc_log_likelihood(probs, [[1], [1]]) == -math.inf
    # "ab" over 2 frames: only a then b; per character: sqrt(0.3 * 0.3)
    assert per_character_likelihood(probs, [[1], [2]]) == pytest.approx(0.3)
    # empty target: every frame blank
    assert per_character_likelihood(probs, []) == pytest.approx(0.05)


def test_case_variants_are_summed_and_spaces_and_unknown_characters_dropped():
    index = {"A": 1, "a": 2, "B": 3, " ": 4, "好": 5}
    assert label_columns("a B好", index) == [[1, 2], [3], [5]]
    assert label_columns("a?", index) == [[1, 2]]  # "?" is not in the dictionary
    # one frame: "a" read as either case
    probs = np.array([[0.1, 0.5, 0.3, 0.05, 0.05, 0.0]])
    assert math.exp(ctc_log_likelihood(probs, label_columns("a", index))) == pytest.approx(0.8)
    assert math.exp(ctc_log_likelihood(probs, label_columns("A", index))) == pytest.approx(0.8)


def test_sharper_frames_score_higher_with_the_same_argmax():
    """What the dense reward exists for: two readings tie, their likelihoods do not."""
    sharp = np.array([[0.05, 0.9, 0.05], [0.9, 0.05, 0.05], [0.05, 0.05, 0.9]])
    blurry = np.array([[0.3, 0.4, 0.3], [0.4, 0.3, 0.3], [0.3, 0.3, 0.4]])
    assert (sharp.argmax(1) == blurry.argmax(1)).all()
    target = [[1], [2]]
    assert 0.0 < per_character_likelihood(blurry, target) < per_character_likelihood(sharp, target) <= 1.0
