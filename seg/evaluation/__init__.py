"""Scoring and predicting with a trained model: confusion-matrix metrics, sliding-window and
test-time-augmented inference, fold and val evaluation, ensembles, prediction export."""
