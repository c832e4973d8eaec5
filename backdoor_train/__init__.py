"""backdoor_train: backdoor (data-poisoning) experiments on MNIST with Ray Train."""

__version__ = "0.1.0"
