"""`CostModelScorer`: load a trained cost model and score images.

  scorer = CostModelScorer.load("runs/cost")    # a cost_model workdir; CLIP folder as recorded
  costs = scorer(images)            # images: NHWC float in [-1, 1] -> float32 (B,) costs
  harmful = costs > scorer.threshold

`threshold` is the anchoring form's decision threshold: 0 for the sign form, (a_h + a_s) / 2 for
the squared form. `probability(costs)` maps costs to the harm probability the form implies
(sigma(c), or the clipped anchored scale). Images of any square or non-square size are accepted;
they are resized/centre-cropped to CLIP's resolution inside the jitted embedder (model.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from scdpo_jax.cost_model import losses
from scdpo_jax.cost_model.model import CostAdapter, make_embedder


class CostModelScorer:
  """Frozen CLIP tower + trained adapter -> safety cost per image."""

  def __init__(self, vision_module, vision_params: Any, adapter: CostAdapter,
               adapter_params: Any, *, anchor: str = "sign", anchor_harmful: float = 1.0,
               anchor_safe: float = 0.0, batch_size: int = 64, mesh=None, rules=None):
    self.vision_module = vision_module
    self.adapter = adapter
    self.adapter_params = adapter_params
    self.anchor, self.anchor_harmful, self.anchor_safe = anchor, anchor_harmful, anchor_safe
    self.threshold = float(losses.anchor_threshold(anchor, anchor_harmful, anchor_safe))
    self.embed = make_embedder(vision_module, vision_params, batch_size=batch_size, mesh=mesh,
                               rules=rules)
    self._costs = jax.jit(lambda p, e: adapter.apply({"params": p}, e))

  @classmethod
  def from_workdir(cls, workdir: str | Path, clip_folder: str | Path | None = None,
                   step: int | None = None, batch_size: int = 64, mesh=None, rules=None
                   ) -> "CostModelScorer":
    """Load from a `cost_model` job's workdir (`cost_model.json` + Orbax `checkpoints/`).

    `clip_folder` overrides the CLIP folder recorded at training time (same weights expected);
    `step` picks a checkpoint (default: the latest); `mesh` / `rules` shard the tower's batches
    (`model.make_embedder`; default: this process's devices, `parallel.DEFAULT_RULES`).
    """
    from scdpo_jax.cost_model.train import CHECKPOINT_DIR, META_NAME
    from scdpo_jax.models import clip_io

    workdir = Path(workdir)
    meta_path = workdir / META_NAME
    if not meta_path.is_file():
      raise FileNotFoundError(f"{meta_path} not found: is {workdir} a cost_model job workdir?")
    meta = json.loads(meta_path.read_text())
    folder = Path(clip_folder or meta["clip_folder"])
    vision_module, vision_params = clip_io.load_clip_vision(folder,
                                                            dtype=jnp.dtype(meta["clip_dtype"]))
    adapter = CostAdapter(**meta["adapter"])
    dim = int(meta["embedding_dim"])
    abstract = jax.eval_shape(adapter.init, jax.random.key(0),
                              jax.ShapeDtypeStruct((1, dim), jnp.float32))["params"]
    manager = ocp.CheckpointManager((workdir / CHECKPOINT_DIR).resolve())
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {workdir / CHECKPOINT_DIR}")
    params = manager.restore(step, args=ocp.args.Composite(
        adapter=ocp.args.StandardRestore(abstract)))["adapter"]
    loss = meta["loss"]
    return cls(vision_module, vision_params, adapter, params, anchor=loss["anchor"],
               anchor_harmful=loss["anchor_harmful"], anchor_safe=loss["anchor_safe"],
               batch_size=batch_size, mesh=mesh, rules=rules)

  @classmethod
  def load(cls, path: str | Path, clip_folder: str | Path | None = None, **kwargs
           ) -> "CostModelScorer":
    """`from_workdir` that also accepts the workdir's `checkpoints/` folder or cost_model.json."""
    from scdpo_jax.cost_model.train import CHECKPOINT_DIR, META_NAME

    path = Path(path)
    if path.name in (CHECKPOINT_DIR, META_NAME):
      path = path.parent
    return cls.from_workdir(path, clip_folder=clip_folder, **kwargs)

  def costs_from_embeddings(self, embeddings: np.ndarray) -> np.ndarray:
    return np.asarray(self._costs(self.adapter_params, jnp.asarray(embeddings, jnp.float32)))

  def __call__(self, images: np.ndarray) -> np.ndarray:
    """NHWC float images in [-1, 1] -> float32 (B,) costs (higher = more harmful)."""
    return self.costs_from_embeddings(self.embed(images))

  def probability(self, costs: np.ndarray) -> np.ndarray:
    return np.asarray(losses.harm_probability(costs, self.anchor, self.anchor_harmful,
                                              self.anchor_safe))

  def is_harmful(self, images: np.ndarray) -> np.ndarray:
    return self(images) > self.threshold
