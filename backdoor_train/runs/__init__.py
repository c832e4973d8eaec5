"""Runs of experiments: one paired experiment (``experiment``), many on one cluster (``trials``),
multi-seed (``seeds``) with its statistics (``stats``), sweeps (``sweep``) and Ray job submission
(``submit``)."""
