"""`python -m scdpo_jax --config configs/<name>.py --workdir runs/<name>`: same as main.py."""

from scdpo_jax.cli import main

main()
