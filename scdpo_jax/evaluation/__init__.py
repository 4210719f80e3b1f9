"""Evaluation: prompt-set runner (`job.py`), safety metrics (`metrics.py`), prompt CSVs
(`prompts.py`) and export of a trained UNet as a diffusers pipeline (`export.py`)."""
