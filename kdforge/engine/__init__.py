"""Training engine: trainer, checkpoints, metric loggers, distributed set-up."""
