"""SC-DPO / Diffusion-DPO training of a Stable Diffusion UNet.

  losses.py          pure per-pair loss functions (NumPy-tested); the step calls exactly these
  step.py            TrainState, StepConfig and the (unjitted) train step
  state.py           plain functions: UNets, abstract state + shardings, init, lower/compile step
  optim.py           optax optimizers and learning-rate schedules from the config
  checkpoint.py      Orbax checkpoints
  metrics_writer.py  metrics.jsonl, TensorBoard, progress lines
  loop.py            the `train` job

May import: parallel, files, models, data (pair format and loaders). Never sampling/evaluation/
shapeworld (they import train) or configs/.
"""
