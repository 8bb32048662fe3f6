"""Training one fold, as a library under the seg/train.py script: the run's records and
refusals, starting its processes and folder, its parts (data, model, optimisation), the
step and its log line, the loop, evaluation with resumable states, signals agreed by every
rank, and the outputs. Above evaluation, which scores the fold's model as it trains."""
