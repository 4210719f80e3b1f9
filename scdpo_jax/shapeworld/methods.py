"""The methods of the ShapeWorld study: one table of what each row of the report is.

Every method is one `Method`: its kind says which code makes its model or images, the rest is
data (the pair set it learns from, its trainer overrides). The kinds:

  base       the pretrained base model, plain classifier-free guidance
  guard      a training-free guard on the base model (sampling/guards.py): negative prompting,
             TraSCE, SLD, SAFREE
  dpo        the `train` job (train/loop.py) from the base on one pair set, `config.finetune`
             with the method's `train`, `data` and `optimizer` overrides
  safetydpo  the `safetydpo` job (lora/safetydpo.py): LoRA experts per category + merge, or the
             all_single baseline, `config.safetydpo` with the method's `safetydpo` overrides
  grpo       the `safediffusion_r1` job (grpo/job.py) from the base, `config.grpo`

Pair sets (built by the study's pairs stage, study.py):

  human    preference reward only (lam = 0, no cost filter): what human preference data gives
  scp      SCP rule on the cost model's costs: s = r - lam C, safe winners under harmful prompts,
           both-safe pairs under clean prompts
  oracle   the same rule with the exact detectors as the cost (C = 1 unsafe, 0 safe): the
           ablation "cost model vs oracle cost"
  coprov2  SafetyDPO's data (CoProV2 style): under a harmful prompt, winner = an image of its
           safe paraphrase, loser = an image of the prompt itself; labelled by construction (no
           cost model), harmful prompts only, each pair tagged with its category

The `sc_dpo` row is the shipped SC-DPO configuration, `config.finetune.train` as it stands
(tuned on the validation split, README "ShapeWorld"); its ablations change one thing each.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

KINDS = ("base", "guard", "dpo", "safetydpo", "grpo")
PAIR_KINDS = ("human", "scp", "oracle", "coprov2")


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  kind: str
  what: str  # one line for the report
  pairs: str = ""  # dpo / safetydpo: the pair set
  train: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # config.finetune.train
  data: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # config.finetune.data
  # config.finetune.optimizer
  optimizer: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  safetydpo: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # config.safetydpo
  # its evaluation's seconds over a plain row's, for the study to start the longest first
  # (default studies on 2 cores, plain row ~41 s: TraSCE 163 s, it differentiates the UNet
  # each step, 188-201 s when its program came from the cache; SAFREE 45-117 s and SLD 66-69 s
  # add passes, SAFREE's spread from what runs beside it, 35 s alone)
  eval_cost: float = 1.0


_SC_DPO = ("SCP pairs (categories balanced), cost margin with lam by dual ascent (variant C), "
           "Dynamic Focusing, winner likelihood term (the shipped configuration)")
# Diffusion-DPO's own lr, chosen on the validation split (README "Tuning"; at 50 steps score
# 0.040 vs -0.045 at 3e-4, at 100 steps 0.020 vs -0.118); the SC-DPO rows take
# config.finetune.optimizer's
DIFFUSION_DPO_LR = 1e-4

REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method("base", "base", "the pretrained base model, CFG"),
    # plain Diffusion-DPO (no winner term, every pair once, as released) at the lr tuned for it
    # on the validation split
    Method("diffusion_dpo", "dpo", "Diffusion-DPO on human-preference pairs", pairs="human",
           train=dict(safety_mode="none", gamma=0.0, sft_weight=0.0),
           data=dict(category_balance="none"), optimizer=dict(lr=DIFFUSION_DPO_LR)),
    Method("sc_dpo", "dpo", "SC-DPO: " + _SC_DPO, pairs="scp"),
    Method("sc_dpo_no_focus", "dpo", "SC-DPO without Dynamic Focusing (gamma = 0)",
           pairs="scp", train=dict(gamma=0.0)),
    Method("sc_dpo_no_sft", "dpo", "SC-DPO without the winner likelihood term (alpha = 0)",
           pairs="scp", train=dict(sft_weight=0.0)),
    Method("sc_dpo_oracle_cost", "dpo",
           "SC-DPO with the exact detectors as the cost (pairs and margin)", pairs="oracle"),
    Method("sc_dpo_relabel", "dpo", "SC-DPO variant A: human pairs relabelled by r - lam C "
           "on the fly, no margin", pairs="human", train=dict(safety_mode="relabel")),
    # the shipped form of the fourth grid (README "Tuning"): lam fixed, no dual ascent
    Method("sc_dpo_margin", "dpo", "SC-DPO variant B: the cost margin with lam fixed at 1 "
           "(no dual ascent)", pairs="scp", train=dict(safety_mode="margin")),
    Method("sc_dpo_sdpo", "dpo", "SC-DPO + the Diffusion-SDPO winner-preserving safeguard "
           "(mu 0.9, its SD1.5 value)", pairs="scp", train=dict(sdpo_mu=0.9)),
    Method("safetydpo", "safetydpo", "SafetyDPO: one LoRA expert per category (Diffusion-DPO "
           "on CoProV2-style pairs) + Co-Merge [I]", pairs="coprov2",
           safetydpo=dict(experts="per_category")),
    Method("all_single", "safetydpo", "SafetyDPO's All-single baseline: one LoRA on every "
           "category's pairs", pairs="coprov2", safetydpo=dict(experts="all_single")),
    Method("safediffusion_r1", "grpo", "SafeDiffusion-R1: online GRPO with the steering reward "
           "of a CLIP trained on the world"),
    Method("negative_prompt", "guard", "negative prompt naming the plain unsafe phrases"),
    Method("trasce", "guard", "TraSCE (nudity preset) with that negative prompt",
           eval_cost=4.0),
    Method("sld", "guard", "Safe Latent Diffusion, diffusers' medium preset",
           eval_cost=1.6),
    Method("safree", "guard", "SAFREE as released, the plain unsafe phrases as its concepts",
           eval_cost=2.2),
)}

METHODS = tuple(REGISTRY)
# The further SC-DPO ablations (beyond sc_dpo_no_focus and sc_dpo_sdpo): outside the default
# study to keep it inside its time budget (README "ShapeWorld"); `--config.methods=all` (or
# default,ablations) adds them in the same workdir, reusing everything else, to the same report.
ABLATIONS = ("sc_dpo_no_sft", "sc_dpo_oracle_cost", "sc_dpo_relabel", "sc_dpo_margin")
DEFAULT = tuple(m for m in METHODS if m not in ABLATIONS)
# names config.methods may use for several rows
GROUPS = {"default": DEFAULT, "ablations": ABLATIONS, "all": METHODS}
FINETUNES = tuple(m for m in METHODS if REGISTRY[m].kind in ("dpo", "safetydpo", "grpo"))
GUARDS = tuple(m for m in METHODS if REGISTRY[m].kind == "guard")
# The rivals of the Pareto claim: Diffusion-DPO and the training-free guards.
PARETO_RIVALS = ("diffusion_dpo",) + GUARDS


def get(name: str) -> Method:
  return REGISTRY[name]


def sampling_guard(name: str) -> str:
  """The guard a row's images are sampled with (generation.py): a guard row's own, else none."""
  return name if get(name).kind == "guard" else "none"
