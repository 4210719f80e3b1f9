"""Peer-recipe configs hold the released recipes' values, and the precision options reach the
UNets: configs/diffusion_dpo_sd15.py (Salesforce Diffusion-DPO launchers/sd15.sh + train.py
defaults), configs/diffusion_dpo_lora_sd15.py (diffusers' research_projects/diffusion_dpo LoRA
port, README SD command); model.dtype / model.ref_dtype / model.ref_param_dtype in
`train.state.make_unets`. No model runs.
"""

import jax.numpy as jnp
import ml_collections
import pytest

from configs import default, diffusion_dpo_lora_sd15, diffusion_dpo_sd15, scdpo_sdxl
from configs.default import tiny_pipeline_config
from scdpo_jax.errors import ConfigError
from scdpo_jax.models import unet_config
from scdpo_jax.train import optim, state as state_lib


def _known_keys(config, reference, prefix=""):
  """Every key of `config` exists in `reference` (a derived config adds no unknown keys)."""
  for key, value in config.items():
    assert key in reference, f"{prefix}{key} is not a configs/default.py key"
    if isinstance(value, ml_collections.ConfigDict) and key != "tiny":
      _known_keys(value, reference[key], f"{prefix}{key}.")


def test_salesforce_diffusion_dpo_recipe():
  config = diffusion_dpo_sd15.get_config()
  _known_keys(config, default.get_config())
  t, o = config.train, config.optimizer
  assert (t.loss_type, t.beta, t.safety_mode, t.gamma) == ("dpo", 5000.0, "none", 0.0)
  assert t.caption_dropout == 0.2  # --proportion_empty_prompts 0.2
  assert (t.pairs_per_step, t.num_steps) == (2048, 2000)
  assert t.pairs_per_step % t.grad_accum == 0
  assert (o.name, o.lr, o.scale_lr, o.warmup_steps, o.schedule) == (
      "adamw", 1e-8, True, 500, "constant")
  assert (o.b1, o.b2, o.eps, o.weight_decay, o.max_grad_norm) == (0.9, 0.999, 1e-8, 1e-2, 1.0)
  assert optim.effective_learning_rate(o, t.pairs_per_step) == pytest.approx(2.048e-5)
  lr = optim.learning_rate_schedule(o, t.num_steps, t.pairs_per_step)
  assert float(lr(250)) == pytest.approx(1.024e-5) and float(lr(1999)) == pytest.approx(2.048e-5)
  assert config.data.hflip and not config.lora.enabled
  assert (config.model.ref_param_dtype, config.model.ref_dtype) == ("float16", "")


def test_diffusers_lora_port_recipe():
  config = diffusion_dpo_lora_sd15.get_config()
  _known_keys(config, default.get_config())
  t, o, lora = config.train, config.optimizer, config.lora
  assert t.beta == 5000.0  # the port's beta_dpo 2500: -logsigmoid(2500 (d_ref - d_theta))
  assert (t.loss_type, t.safety_mode, t.gamma, t.caption_dropout) == ("dpo", "none", 0.0, 0.0)
  assert (t.pairs_per_step, t.num_steps) == (32, 10000)  # 16 x grad-acc 2
  assert (lora.enabled, lora.rank, lora.alpha, lora.init, tuple(lora.targets)) == (
      True, 8, 8.0, "gaussian", ("attention",))
  assert (o.name, o.lr, o.scale_lr, o.warmup_steps, o.schedule, o.max_grad_norm) == (
      "adamw", 1e-5, False, 0, "constant", 1.0)
  lr = optim.learning_rate_schedule(o, t.num_steps, t.pairs_per_step)
  assert float(lr(0)) == pytest.approx(1e-5)  # no warmup


def test_salesforce_sdxl_recipe():
  """configs/scdpo_sdxl.py (launchers/sdxl.sh + train.py --sdxl): Adafactor, 1e-8 x 2048, 200
  warmup, remat; the variants share it and differ in the SC-DPO terms only."""
  full = {v: scdpo_sdxl.get_config(v) for v in ("scdpo", "diffusion_dpo")}
  for variant, config in full.items():
    _known_keys(config, default.get_config())
    t, o = config.train, config.optimizer
    assert (t.loss_type, t.beta, t.caption_dropout) == ("dpo", 5000.0, 0.2)
    assert (t.pairs_per_step, t.num_steps) == (2048, 2000) and t.pairs_per_step % t.grad_accum == 0
    assert (o.name, o.lr, o.scale_lr, o.warmup_steps, o.schedule, o.weight_decay) == (
        "adafactor", 1e-8, True, 200, "constant", 1e-2)
    assert o.max_grad_norm == 1.0  # --sdxl without --use_adafactor keeps clip_grad_norm_
    lr = optim.learning_rate_schedule(o, t.num_steps, t.pairs_per_step)
    assert float(lr(100)) == pytest.approx(1.024e-5) and float(lr(1999)) == pytest.approx(2.048e-5)
    assert config.model.remat_policy == "block" and config.data.hflip and not config.lora.enabled
  assert (full["diffusion_dpo"].train.safety_mode, full["diffusion_dpo"].train.gamma) == (
      "none", 0.0)
  assert full["diffusion_dpo"].model.ref_param_dtype == "float16"
  s = full["scdpo"].train
  assert (s.safety_mode, s.lam, s.gamma) == ("margin", 1.0, 1.0)
  lora = scdpo_sdxl.get_config("lora")  # the diffusers port's README SDXL command
  _known_keys(lora, default.get_config())
  t, o, a = lora.train, lora.optimizer, lora.lora
  assert (a.enabled, a.rank, a.alpha, a.init, tuple(a.targets)) == (
      True, 8, 8.0, "gaussian", ("attention",))
  assert (t.beta, t.caption_dropout, t.pairs_per_step, t.num_steps, t.safety_mode) == (
      5000.0, 0.0, 16, 2000, "none")
  assert (o.name, o.lr, o.scale_lr, o.warmup_steps, o.max_grad_norm) == (
      "adamw", 1e-5, False, 0, 1.0)
  assert scdpo_sdxl.get_config("scdpo_lora").train.safety_mode == "margin"
  with pytest.raises(ValueError, match="unknown variant"):
    scdpo_sdxl.get_config("sdxl")


def _model(**kw):
  c = default.get_config().model
  c.update(kw)
  return c


def test_precision_options_reach_the_unets():
  cfg = unet_config.UNetConfig.from_dict(tiny_pipeline_config().unet.to_dict())
  policy, reference = state_lib.make_unets(_model(dtype="bfloat16", ref_param_dtype="float16"),
                                           cfg)
  assert (policy.dtype, policy.param_dtype) == (jnp.bfloat16, jnp.float32)
  assert (reference.dtype, reference.param_dtype) == (jnp.bfloat16, jnp.float16)  # "" = dtype
  _, reference = state_lib.make_unets(_model(dtype="bfloat16", ref_dtype="float32"), cfg)
  assert (reference.dtype, reference.param_dtype) == (jnp.float32, jnp.float32)
  legacy = _model()
  del legacy["ref_dtype"]  # configs written before the option: the reference follows model.dtype
  assert state_lib.make_unets(legacy, cfg)[1].dtype == jnp.float32
  for key in ("dtype", "ref_dtype", "ref_param_dtype"):
    with pytest.raises(ConfigError, match=f"model.{key}='fp16'"):
      state_lib.make_unets(_model(**{key: "fp16"}), cfg)
