"""What a run writes and shows: its records read back, its figures, and its tracking (wandb,
TensorBoard). Below everything that produces results, so each of them can log."""
