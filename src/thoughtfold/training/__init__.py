"""Training: the shared loop, one file per trainer, the loss maths, checkpoints, metrics, processes."""
