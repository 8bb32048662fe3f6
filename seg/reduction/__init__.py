"""Reducing a stage's fold models to one: weight averaging (soups), BatchNorm recalibration,
the reduction itself."""
