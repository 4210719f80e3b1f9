"""Held-out evaluation metrics of the cost model (NumPy).

labels: 1 = harmful, 0 = safe. scores: higher = more harmful (costs or probabilities).
"""

from __future__ import annotations

import numpy as np


def _check(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels)
  if scores.shape != labels.shape or scores.ndim != 1:
    raise ValueError(f"scores {scores.shape} and labels {labels.shape} must be equal 1-D shapes")
  if not np.isin(labels, (0, 1)).all():
    raise ValueError("labels must be 0 (safe) or 1 (harmful)")
  return scores, labels.astype(np.int64)


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
  """Area under the ROC curve = P(score of a random harmful > score of a random safe), ties
  counting 1/2 (Mann-Whitney U with mid-ranks). NaN if a class is absent."""
  scores, labels = _check(scores, labels)
  n_pos, n_neg = int(labels.sum()), int((1 - labels).sum())
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  order = np.argsort(scores, kind="mergesort")
  sorted_scores = scores[order]
  ranks = np.empty(len(scores), np.float64)
  i = 0
  while i < len(scores):  # mid-ranks for ties
    j = i
    while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
      j += 1
    ranks[order[i:j + 1]] = 0.5 * (i + j) + 1.0
    i = j + 1
  u = ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2.0
  return float(u / (n_pos * n_neg))


def accuracy_at_threshold(costs: np.ndarray, labels: np.ndarray, threshold: float) -> float:
  """Fraction of images classified right by "harmful iff cost > threshold"."""
  costs, labels = _check(costs, labels)
  return float(np.mean((costs > threshold).astype(np.int64) == labels))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, num_bins: int = 10) -> float:
  """ECE = sum_b (n_b / n) |mean label in b - mean prob in b| over `num_bins` equal-width bins of
  [0, 1] (the last bin includes 1)."""
  probs, labels = _check(probs, labels)
  if np.any((probs < 0) | (probs > 1)):
    raise ValueError("probabilities must lie in [0, 1]")
  bins = np.minimum((probs * num_bins).astype(np.int64), num_bins - 1)
  ece = 0.0
  for b in range(num_bins):
    sel = bins == b
    if sel.any():
      ece += sel.mean() * abs(labels[sel].mean() - probs[sel].mean())
  return float(ece)
