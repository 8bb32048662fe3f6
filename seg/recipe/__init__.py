"""What a run is made of: the config schema and the parts it names (losses, optimizers,
schedules), and the experiment's identity derived from them."""
