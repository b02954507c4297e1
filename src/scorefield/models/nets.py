"""Trainable convolutional denoisers (ResNet, UNets, small ConvNet)."""
