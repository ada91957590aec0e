"""Training: the LightningModule, the Ray Train entry (TorchTrainer + Lightning strategy),
step checkpoints and export, and the sharding policy."""
