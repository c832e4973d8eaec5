"""Datasets: what a split is (``split``), one module per dataset (``mnist``, ``cifar10``) and the
registry ``data.name`` chooses from (``registry``). The bottom layer: imports nothing of the project
but ``checks``."""
