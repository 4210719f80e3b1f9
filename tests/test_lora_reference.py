"""One LoRA DPO train step against an independent PyTorch diffusers + peft transcription (fp32).

The torch side: the tiny diffusers UNet of tests/test_train_reference.py as the frozen base, a
peft LoRA (rank 4, alpha 8, to_q/to_k/to_v/to_out.0 and proj_in/proj_out, B randomised so the
policy differs from the base) added with diffusers' `add_adapter`, the reference = the same UNet
with the adapters disabled (`disable_adapters`), and the loss transcription `torch_step` of
tests/test_train_reference.py (Salesforce/DiffusionDPO semantics plus the SC-DPO margin and
focusing). Our side: the LoRA imported from the file diffusers writes for it
(`save_lora_weights`), the real `make_lora_train_step` (base = our conversion of the torch
UNet, also the reference), gradients read out through an optimizer whose state is the last
gradient. Compared: the loss and the gradient of every LoRA factor (relative to the largest,
<= 1e-5), with gamma 0 and gamma 1 (the margin config's ramp) and with 2 micro-batches.
"""

import copy

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
from flax import traverse_util
from peft.utils import get_peft_model_state_dict

from scdpo_jax.lora import io as lora_io, train as lora_train
from scdpo_jax.models import convert
from scdpo_jax.train import step as step_lib
from tests import test_train_reference as ref_lib

TOL = 1e-5
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out"]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
  import torch
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # torch's thread pool competing with XLA's is 10-50x slower here
  yield
  torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  m = ref_lib._models("unet")
  base_t = m.ref_t  # the frozen base (and reference)
  policy_t = copy.deepcopy(base_t)
  policy_t.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                                       target_modules=TARGETS))
  import torch
  torch.manual_seed(5)
  with torch.no_grad():
    for name, p in policy_t.named_parameters():
      if "lora_B" in name:
        p.copy_(0.05 * torch.randn_like(p))
  for p in policy_t.parameters():  # torch_step reads every parameter's grad
    p.requires_grad_(True)
  folder = tmp_path_factory.mktemp("lora_ref")
  diffusers.StableDiffusionPipeline.save_lora_weights(
      folder, unet_lora_layers=get_peft_model_state_dict(policy_t),
      unet_lora_adapter_metadata=policy_t.peft_config["default"].to_dict())
  lora, scale, _ = lora_io.load_lora(folder, m.shapes)
  assert scale == 2.0
  return m, policy_t, lora, scale


class _Disabled:
  """The torch policy with its adapters off: the base, i.e. the DPO reference."""

  def __init__(self, unet):
    self.unet = unet

  def __call__(self, *args, **kwargs):
    self.unet.disable_adapters()
    try:
      return self.unet(*args, **kwargs)
    finally:
      self.unet.enable_adapters()


@pytest.mark.parametrize("name,step,gamma", [("margin", 0, 0.0), ("margin", 2, 1.0),
                                             ("relabel_accum2", 0, 0.0)])
def test_lora_step_matches_torch_peft(setup, name, step, gamma):
  m, policy_t, lora, scale = setup
  cfg = m.cfgs[name]
  step_fn = lora_train.make_lora_train_step(
      policy=m.module, reference=m.module, optimizer=ref_lib._capture_grads(),
      schedule=m.schedule, cfg=cfg, scale=scale)
  state = step_lib.TrainState(
      step=jnp.asarray(step, jnp.int32), params=lora,
      opt_state=jax.tree.map(jnp.zeros_like, lora), lam=jnp.asarray(ref_lib.LAM, jnp.float32),
      skipped=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(step))
  rnd = ref_lib._randomness(m, state, cfg)
  new_state, metrics = jax.jit(step_fn)(state, m.ref_params, m.batch, m.empty_states)
  ref = ref_lib.torch_step(m, t=rnd["t"], noise=rnd["noise"], drop=np.asarray(rnd["drop_caption"]),
                           lam=ref_lib.LAM, gamma=gamma, cfg=cfg, policy=policy_t,
                           reference=_Disabled(policy_t))
  np.testing.assert_allclose(float(metrics["gamma"]), gamma, rtol=1e-6)
  loss_err = abs(float(metrics["objective"]) - ref["loss"]) / abs(ref["loss"])
  assert loss_err <= TOL, loss_err
  assert np.abs(ref["logit"]).max() < 10 and np.abs(ref["logit"]).max() > 0.1

  ours = traverse_util.flatten_dict(jax.device_get(new_state.opt_state))
  by_name = {lora_io.torch_module_name(p[:-1]) + "." + p[-1]: v for p, v in ours.items()}
  torch_grads = {}
  for pname, g in ref["grads"].items():
    if ".lora_" in pname:
      module, rest = pname.split(".lora_")
      key = f"{module}.lora_{rest[0]}"
      torch_grads[key] = convert.flax_layout("kernel", g.numpy())
  assert set(torch_grads) == set(by_name) and len(by_name) == 2 * 10
  scale_g = max(float(np.abs(g).max()) for g in torch_grads.values())
  err = max(float(np.abs(np.asarray(by_name[k], np.float64) - torch_grads[k]).max())
            for k in torch_grads) / scale_g
  print(f"{name} step {step}: loss rel err {loss_err:.1e}, LoRA grads rel err {err:.1e}")
  assert scale_g > 1e-4
  assert err <= TOL, err
