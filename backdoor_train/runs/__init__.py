"""The drivers: one paired experiment (``experiment``), many on one cluster (``trials``),
multi-seed (``seeds``) with its statistics (``stats``), sweeps (``sweep``), the defenses run on a
finished experiment with retraining (``detection``), the start they share (``locked``) and Ray job
submission (``submit``)."""
