"""SC-DPO training: losses, train state and step, the training loop."""
