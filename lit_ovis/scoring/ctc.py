"""The likelihood a CTC text recogniser gives a target string: a dense OCR reward (pure functions).

A discrete reading scores a group of GRPO rollouts alike whenever they read the same, so a sharper but still
misread character earns nothing. The recogniser's own probability of the target text does: it is the sum over
every CTC alignment of the per-frame probabilities (the forward algorithm of Graves et al. 2006). We report it
per target character, exp(log p / L), so that it lies in [0, 1] and does not shrink with the text's length.

The word metrics compare lower-cased words, so one target character may be read in either case: its
probability in a frame is the sum over its case variants in the recogniser's dictionary.
"""

from __future__ import annotations

import numpy as np

BLANK = 0  # rapidocr's CTC dictionary puts the blank first


def label_columns(target: str, index: dict[str, int]) -> list[list[int]]:
    """Dictionary columns of each target character (its case variants); spaces and characters the dictionary
    lacks are left out (the recogniser lets the blank win over word gaps, see `lit_ovis.scoring.ocr`)."""
    columns = []
    for ch in target:
        if ch.isspace():
            continue
        variants = {ch, ch.lower(), ch.upper()}
        found = sorted(index[v] for v in variants if v in index)
        if found:
            columns.append(found)
    return columns


def ctc_log_likelihood(probs: np.ndarray, columns: list[list[int]], blank: int = BLANK) -> float:
    """log p(target | frames) under CTC: `probs` [T, C] per-frame class probabilities, `columns` the classes
    each target label may be read as (summed). Returns -inf when the target needs more frames than T."""
    probs = np.asarray(probs, dtype=np.float64)
    frames = probs.shape[0]
    if not columns:
        return float(np.log(np.clip(probs[:, blank], 1e-300, None)).sum())
    labels = np.stack([probs[:, cols].sum(axis=1) for cols in columns], axis=1)  # [T, L]
    # extended sequence: blank, l1, blank, l2, ..., lL, blank
    size = 2 * len(columns) + 1
    emit = np.empty((frames, size))
    emit[:, 0::2] = probs[:, [blank]]
    emit[:, 1::2] = labels
    log_emit = np.log(np.clip(emit, 1e-300, None))
    # a skip over a blank is allowed into a label unless it repeats the label two places back
    skip = np.zeros(size, dtype=bool)
    for s in range(3, size, 2):
        skip[s] = columns[(s - 1) // 2] != columns[(s - 3) // 2]
    alpha = np.full(size, -np.inf)
    alpha[:2] = log_emit[0, :2]
    for t in range(1, frames):
        stay = alpha
        step = np.concatenate([[-np.inf], alpha[:-1]])
        jump = np.where(skip, np.concatenate([[-np.inf, -np.inf], alpha[:-2]]), -np.inf)
        alpha = np.logaddexp(np.logaddexp(stay, step), jump) + log_emit[t]
    return float(np.logaddexp(alpha[-1], alpha[-2]))


def per_character_likelihood(probs: np.ndarray, columns: list[list[int]], blank: int = BLANK) -> float:
    """exp(log p / L) in [0, 1]: the geometric mean probability per target character (p itself when the
    target is empty: the probability that nothing is read)."""
    log_p = ctc_log_likelihood(probs, columns, blank)
    return float(np.exp(log_p / max(len(columns), 1)))
