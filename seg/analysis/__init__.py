"""Reading finished experiments: reports and comparisons between experiments."""
