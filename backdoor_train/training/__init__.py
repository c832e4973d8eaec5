"""Training on Ray Train: the worker loop (``worker``), launching the fits (``fitting``), checkpoints
(``checkpoint``), resuming (``resume``), the Ray session (``raysession``), Ray's private API
(``rayinternals``), DDP's rendezvous (``rendezvous``), worker metrics (``metrics``) and failures told
in one line (``failures``)."""
