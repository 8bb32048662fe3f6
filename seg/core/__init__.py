"""The ground every layer stands on: atomic writes, the run folders' layout, leases, storage
checks, signals, processes and the Cityscapes label set. Imports nothing else of seg."""
