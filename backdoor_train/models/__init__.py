"""Architectures: the registry ``model.arch`` chooses from with the article's CNN (``registry``) and
ResNet-18 in its CIFAR form (``resnet``). Imports only ``data``."""
