"""backdoor_train: backdoor (data-poisoning) experiments on image datasets with Ray Train."""

__version__ = "0.1.0"
