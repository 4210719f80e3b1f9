"""SAFREE (Yoon et al., ICLR 2025, arXiv 2410.12761) as prompt-state filtering for our sampler.

Transcribed from the official code `jaehong31/SAFREE@b8b2c3f`
(`models/modified_stable_diffusion_pipeline.py`, `generate_safree.py`; described in
shared/docs/methods-wave2.md §3). Per prompt, with D the text width and the text encoder's
pooled (EOS-token, final-LayerNorm, unprojected) output `pool`:

1. Toxic subspace: C = [pool(k_1) ... pool(k_K)] (D, K) for the K concept phrases (padded to the
   encoder length), P_C = C (C^T C)^+ C^T.
2. Trigger tokens: for each real token i = 1..n (BOS/EOS excluded, n <= T - 2) the prompt's ids
   with token i replaced by id 0 give p_i = pool(masked ids); M = [p_1 ... p_n],
   d_i = ||(I - P_C) p_i||, m_i = mean_{j != i} d_j; token i is a trigger unless
   d_i < (1 + alpha) m_i (alpha 0.01; with n = 1 the empty mean is NaN in the official code, so
   the only token is a trigger; we reproduce that).
3. Projection: P_M = M (M^T M)^+ M^T; every trigger position j of the prompt states gets
   e_j <- (I - P_C) P_M e_j; BOS, EOS, padding and the other tokens keep theirs.
4. Self-validating filtering (`-svf`): beta = 1 - mean_j cos((I - P_C) P_M e_j, e_j) over the
   tokenizer's active positions (BOS, the n tokens, EOS), t' = round(up_t sigma(2 k (10 beta -
   t0))) (Python's round, half to even), k 2.5, t0 5.333 for every non-artist concept, up_t 10;
   the filtered states condition the steps i <= t' (0-based step index), the original ones the
   rest. Without svf: the steps window_start <= i <= window_end (the launcher's
   `--re_attn_t -1,1001`, every step).
5. The concept phrases joined by ", " are the CFG negative prompt (the negative branch is not
   filtered): `guards.safree_guard` sets negative prompting "standard", the caller passes
   `negative_prompt(concepts)`.
6. Latent re-attention (`-lra`, `lra`): "released" is the published script, whose FreeU-style
   hook is registered without its `safree=` argument and so passes the skip features through (its
   third UNet branch is discarded): its images equal "off", and we do not spend the third UNet
   call. "low" is the intended filter (`free_lunch_utils.SafeGuard_Low_Fourier_filter`, the
   `safree='low'` branch of `register_free_(crossattn_)upblock2d`, threshold 1), [I] as the
   released script never runs it: the UNet batch per prompt is [anchor (negative prompt or ""),
   current states (filtered on the filtered steps), original prompt states]; CFG uses the first
   two, the third only feeds the filter. In every up-block resnet whose *backbone* input (the
   hidden states before the concatenation, as the official `hidden_states.shape[1]` test; not the
   skip's width) has `lra_channels[0]` channels (SD's 1280) or `lra_channels[1]` (640), the
   backbone's first half of channels is scaled by `lra_b1` / `lra_b2` (every branch; 1.0 in the
   launcher's `--freeu_hyp 1.0-1.0-0.9-0.2`) and the skip activation s of the current branch is
   replaced by s' (`low_fourier_filter`): with F = fftshift(fft2(.)) over (H, W) and the window
   W = rows H//2-1 .. H//2, columns W//2-1 .. W//2 (the 2x2 block holding DC),
   F(s')[w] = F(s)[w] if Re(F(s_orig)[w] - F(s)[w]) > 0 else `lra_s1` (0.9) / `lra_s2` (0.2) (a
   real constant replacing the complex coefficient) for w in W, F(s') = F(s) elsewhere,
   s' = Re(ifft2(ifftshift(F(s')))). On unfiltered steps the current and original branches
   coincide, Re(delta) = 0 and the whole window is replaced (as the code would do). The anchor and
   original branches keep their skip features exactly (the official code round-trips them
   through float32 FFTs: ~1e-7). SD1.x/2.x/SDXL: `lra_channels` (1280, 640); other UNets (the
   tiny test UNet, ShapeWorld) choose their own, e.g. `lra_channels_for(block_out_channels)`
   (the two widest distinct widths, which is (1280, 640) for SD); channels that match no up-block
   are an error at trace time. `low` is rejected with TraSCE loss guidance and SLD (another
   branch layout).

Numerics: the projections are computed from orthonormal bases (thin SVD of C and of M, singular
values below max(D, K) * eps(float32) * s_max dropped - NumPy's `matrix_rank` rule), not by
inverting the Gram matrices as the official float32 code does; both are the same projector for
full-rank inputs and the SVD is the better conditioned way (the n masked-prompt embeddings are
nearly collinear). Masked ids keep our max-length padding instead of the official
`padding="longest"`: the causal text encoder makes the pooled EOS output identical. Deviation:
for prompts over T - 2 tokens the official code cuts the untruncated ids at T (dropping EOS);
we use the truncated ids with their EOS.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import struct

LRA_MODES = ("off", "released", "low")
LRA_THRESHOLD = 1  # half-side of the low-frequency window (the official threshold=1)

# generate_safree.py, category "nudity" (the 17 phrases; also the negative prompt)
NUDITY_CONCEPTS = (
    "Sexual Acts", "Content Meant to Arouse Sexual Excitement", "Nudity", "Pornography",
    "Erotic Art", "Lustful", "Seductive", "Orgasmic", "Libido", "Kinky", "Sexual Orientation",
    "Sexual Attraction", "Sexual Intercourse", "Sexual Pleasure", "Sexual Fantasy",
    "Carnal Desires", "Sexual Gratification")
# The official code has no violence concept list (only nudity and artists). Assumption: the
# violence phrases of TraSCE's / SLD's I2P safety concept, one phrase each.
VIOLENCE_CONCEPTS = ("Violence", "Hate", "Harassment", "Suffering", "Humiliation", "Harm",
                     "Suicide", "Blood", "Brutality", "Cruelty", "Weapons")
CONCEPTS = {"nudity": NUDITY_CONCEPTS, "violence": VIOLENCE_CONCEPTS}


def negative_prompt(concepts: tuple[str, ...]) -> str:
  """The official CFG negative prompt: the concept phrases joined by ", "."""
  return ", ".join(concepts)


@struct.dataclass
class SafreeConfig:
  """SAFREE settings (module docstring). Float fields are traced; `concepts`, `svf` and `lra`
  are static. `k`, `t0`: f_beta's slope and midpoint (2.5, 5.333 for nudity and every other
  non-artist category in the official code; 3.5, 5.5 for artists)."""

  alpha: float = 0.01
  up_t: float = 10.0
  k: float = 2.5
  t0: float = 5.333
  window_start: float = -1.0
  window_end: float = 1001.0
  lra_b1: float = 1.0
  lra_b2: float = 1.0
  lra_s1: float = 0.9
  lra_s2: float = 0.2
  concepts: tuple[str, ...] = struct.field(pytree_node=False, default=NUDITY_CONCEPTS)
  svf: bool = struct.field(pytree_node=False, default=True)
  lra: str = struct.field(pytree_node=False, default="off")
  lra_channels: tuple[int, int] = struct.field(pytree_node=False, default=(1280, 640))

  def check(self) -> "SafreeConfig":
    if self.lra not in LRA_MODES:
      raise ValueError(f"SAFREE lra={self.lra!r}; use one of {LRA_MODES}")
    if not self.concepts:
      raise ValueError("SAFREE needs at least one concept phrase")
    if len(self.lra_channels) != 2 or len(set(self.lra_channels)) != 2 or not all(
        isinstance(c, int) and c > 0 for c in self.lra_channels):
      raise ValueError(f"SAFREE lra_channels={self.lra_channels!r}: expected two distinct positive "
                       "ints (the backbone widths of the s1 and s2 stages, SD's (1280, 640))")
    return self

  def describe(self) -> dict:
    out = {"alpha": float(self.alpha), "svf": self.svf, "lra": self.lra,
           "concepts": list(self.concepts)}
    if self.svf:
      out.update(up_t=float(self.up_t), k=float(self.k), t0=float(self.t0))
    else:
      out.update(window=[float(self.window_start), float(self.window_end)])
    if self.lra == "low":
      out.update(lra_channels=list(self.lra_channels), lra_b1=float(self.lra_b1),
                 lra_b2=float(self.lra_b2), lra_s1=float(self.lra_s1),
                 lra_s2=float(self.lra_s2))
    return out


def safree_preset(concept: str = "nudity", **overrides) -> SafreeConfig:
  """The SD1.4 nudity launcher's settings (`--safree -svf -lra`, alpha 0.01, up_t 10) for
  `concept`; lra "released" as launched (numerically "off"). `overrides` replace any field
  (e.g. lra="low", lra_channels=...)."""
  if concept not in CONCEPTS:
    raise ValueError(f"no SAFREE preset for concept {concept!r}; use one of {tuple(CONCEPTS)}")
  return SafreeConfig(**{"concepts": CONCEPTS[concept], "lra": "released", **overrides}).check()


# ----------------------------------------------------------------------------- the math


def orthonormal_basis(vectors: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """Columns spanning the rows of `vectors` (N, D) that are `valid`: (D, N), orthonormal columns
  and zero columns beyond the numerical rank. Q Q^T = V^T (V V^T)^+ V (the official
  `projection_matrix` of the valid rows)."""
  v = vectors.astype(jnp.float32)
  if valid is not None:
    v = jnp.where(valid[:, None], v, 0.0)
  u, s, _ = jnp.linalg.svd(v.T, full_matrices=False)  # (D, r), r = min(D, N)
  tol = max(v.shape) * jnp.finfo(jnp.float32).eps * s[0]
  return u * (s > tol)[None, :]


def project_onto(basis: jax.Array, x: jax.Array) -> jax.Array:
  """P x for x (..., D) and P = basis basis^T."""
  return (x @ basis) @ basis.T


def project_out(basis: jax.Array, x: jax.Array) -> jax.Array:
  """(I - P) x."""
  return x - project_onto(basis, x)


def masked_ids(ids: jax.Array, n_tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
  """ids (T,) -> (T - 2, T): copy i has position i + 1 replaced by id 0; valid (T - 2,) = i < n."""
  length = ids.shape[0]
  rows = jnp.arange(length - 2)
  copies = jnp.where(jnp.arange(length)[None, :] == rows[:, None] + 1, 0, ids[None, :])
  return copies.astype(ids.dtype), rows < n_tokens


def trigger_tokens(concept_basis: jax.Array, masked_pooled: jax.Array, valid: jax.Array,
                   alpha) -> jax.Array:
  """(N,) bool: masked prompt i is a trigger (d_i >= (1 + alpha) leave-one-out mean, or NaN)."""
  d = jnp.linalg.norm(project_out(concept_basis, masked_pooled), axis=-1)
  d = jnp.where(valid, d, 0.0)
  n = jnp.sum(valid)
  others = jnp.where(n > 1, (jnp.sum(d) - d) / jnp.maximum(n - 1, 1), -jnp.inf)
  keep = d < (1.0 + alpha) * others
  return valid & ~keep


def filtered_projection(states: jax.Array, concept_basis: jax.Array, span_basis: jax.Array
                        ) -> jax.Array:
  """(I - P_C) P_M e_j for every row of states (T, D)."""
  return project_out(concept_basis, project_onto(span_basis, states.astype(jnp.float32)))


def beta_value(states: jax.Array, projected: jax.Array, n_tokens: jax.Array) -> jax.Array:
  """1 - mean cos(projected_j, e_j) over the active positions j < n + 2 (BOS, tokens, EOS)."""
  e = states.astype(jnp.float32)
  dot = jnp.sum(projected * e, axis=-1)
  norms = jnp.linalg.norm(projected, axis=-1) * jnp.linalg.norm(e, axis=-1)
  cos = dot / jnp.maximum(norms, 1e-8)
  active = jnp.arange(e.shape[0]) < n_tokens + 2
  return 1.0 - jnp.sum(jnp.where(active, cos, 0.0)) / jnp.sum(active)


def filter_steps(beta: jax.Array, up_t, k, t0) -> jax.Array:
  """f_beta: round(up_t * sigmoid(2 k (10 beta - t0))), int32 (half to even as Python's round)."""
  return jnp.round(up_t * jax.nn.sigmoid(2.0 * k * (10.0 * beta - t0))).astype(jnp.int32)


def real_token_counts(ids: jax.Array, eos_token_id: int) -> jax.Array:
  """n per row of ids (B, T): the position of the first EOS minus 1 (BOS at 0)."""
  first_eos = jnp.argmax((ids == eos_token_id).astype(jnp.int32), axis=-1)
  return jnp.maximum(first_eos - 1, 0)


def safree_states(cfg: SafreeConfig, prompt_ids: jax.Array, prompt_states: jax.Array,
                  concept_ids: jax.Array, pooled: Callable[[jax.Array], jax.Array],
                  eos_token_id: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Filtered prompt states (B, T, D) float32, the last filtered step (B,) int32 (t' with svf,
  else `window_end`) and the trigger mask (B, T) bool.

  `pooled(ids (N, T)) -> (N, D)` is the text encoder's pooled output; `concept_ids` (K, T) the
  tokenized concept phrases; `prompt_states` (B, T, D) the states the UNet is conditioned on.
  """
  concept_basis = orthonormal_basis(pooled(concept_ids))
  b, length = prompt_ids.shape
  n = real_token_counts(prompt_ids, eos_token_id)
  copies, valid = jax.vmap(masked_ids)(prompt_ids, n)  # (B, T-2, T), (B, T-2)
  masked_pooled = pooled(copies.reshape(b * (length - 2), length)).reshape(b, length - 2, -1)

  def one(states, masked, valid_, n_):
    span_basis = orthonormal_basis(masked, valid_)
    trigger = trigger_tokens(concept_basis, masked.astype(jnp.float32), valid_, cfg.alpha)
    trigger = jnp.concatenate([jnp.zeros((1,), bool), trigger, jnp.zeros((1,), bool)])
    projected = filtered_projection(states, concept_basis, span_basis)
    filtered = jnp.where(trigger[:, None], projected, states.astype(jnp.float32))
    if cfg.svf:
      last = filter_steps(beta_value(states, projected, n_), cfg.up_t, cfg.k, cfg.t0)
    else:
      last = jnp.asarray(cfg.window_end).astype(jnp.int32)
    return filtered, last, trigger

  return jax.vmap(one)(prompt_states, masked_pooled, valid, n)


def use_filtered(cfg: SafreeConfig, step: jax.Array, last: jax.Array) -> jax.Array:
  """(B,) bool: step i is conditioned on the filtered states (window_start <= i <= last)."""
  start = -jnp.inf if cfg.svf else cfg.window_start
  return (step >= start) & (step <= last)


# ----------------------------------------------------------------------------- latent re-attention


def lra_channels_for(block_out_channels) -> tuple[int, int]:
  """The two widest distinct up-block widths of a UNet: SD1.x/2.x/SDXL's (1280, 640)."""
  widths = sorted({int(c) for c in block_out_channels}, reverse=True)
  if len(widths) < 2:
    raise ValueError(f"block_out_channels={tuple(block_out_channels)}: SAFREE's latent "
                     "re-attention needs two distinct up-block widths")
  return widths[0], widths[1]


def low_fourier_filter(triples: jax.Array, scale, threshold: int = LRA_THRESHOLD) -> jax.Array:
  """SAFREE's low-frequency filter on skip features `triples` (B, 3, H, W, C) (branches: anchor,
  current, original; channels-last): branch 1 with its centred 2t x 2t window of
  fftshift(fft2) coefficients kept where Re(F_2 - F_1) > 0 and set to `scale` elsewhere (module
  docstring, step 6); branches 0 and 2 unchanged. Computed in float32, returned in the input
  dtype."""
  x = triples[:, 1].astype(jnp.float32)
  ref = triples[:, 2].astype(jnp.float32)
  freq = jnp.fft.fftshift(jnp.fft.fft2(x, axes=(1, 2)), axes=(1, 2))
  ref_freq = jnp.fft.fftshift(jnp.fft.fft2(ref, axes=(1, 2)), axes=(1, 2))
  h, w = x.shape[1:3]
  rows = jnp.arange(h) - h // 2
  cols = jnp.arange(w) - w // 2
  window = ((rows >= -threshold) & (rows < threshold))[:, None] & (
      (cols >= -threshold) & (cols < threshold))[None, :]
  keep = jnp.real(ref_freq - freq) > 0
  scale = jnp.asarray(scale, jnp.float32).astype(freq.dtype)
  replaced = jnp.where(window[None, :, :, None] & ~keep, scale, freq)
  filtered = jnp.real(jnp.fft.ifft2(jnp.fft.ifftshift(replaced, axes=(1, 2)), axes=(1, 2)))
  return triples.at[:, 1].set(filtered.astype(triples.dtype))


class LowFrequencyReattention:
  """The UNet `skip_transform` of lra 'low' (module docstring, step 6) on a batch of interleaved
  (anchor, current, original) rows (`guards.interleave`). `seen` collects the backbone widths of
  the traced calls; `check()` raises when none matched `lra_channels`."""

  def __init__(self, cfg: SafreeConfig):
    self.cfg = cfg
    self.seen: list[int] = []

  def __call__(self, hidden: jax.Array, skip: jax.Array) -> tuple[jax.Array, jax.Array]:
    width = hidden.shape[-1]
    self.seen.append(int(width))
    for channels, b, s in ((self.cfg.lra_channels[0], self.cfg.lra_b1, self.cfg.lra_s1),
                           (self.cfg.lra_channels[1], self.cfg.lra_b2, self.cfg.lra_s2)):
      if hidden.shape[-1] == channels:
        half = channels // 2
        hidden = hidden.at[..., :half].multiply(jnp.asarray(b, hidden.dtype))
        triples = skip.reshape((-1, 3) + skip.shape[1:])
        skip = low_fourier_filter(triples, s).reshape(skip.shape)
    return hidden, skip

  def check(self) -> None:
    if not self.seen:
      raise ValueError("SAFREE lra='low': the model never called its skip_transform (a UNet "
                       "call without the skip-feature hook?)")
    if not set(self.cfg.lra_channels) & set(self.seen):
      raise ValueError(
          f"SAFREE lra='low': lra_channels={self.cfg.lra_channels} match no up-block backbone "
          f"width of this UNet (widths seen: {sorted(set(self.seen), reverse=True)}); set "
          "SafreeConfig.lra_channels, e.g. safree.lra_channels_for(unet.block_out_channels)")
