"""Helpers for building tiny PyTorch reference models (test-only: needs torch, diffusers, transformers)."""

import numpy as np


def to_numpy(t):
  return t.detach().cpu().float().numpy()


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
  return np.transpose(x, (0, 2, 3, 1))


def nhwc_to_nchw(x: np.ndarray) -> np.ndarray:
  return np.transpose(x, (0, 3, 1, 2))
