"""Structured pruning: remove layers, MLP channels, key/value head groups and experts.

``criteria`` scores and chooses what goes; ``compensate`` refits the layer that reads a sliced
input by least squares."""
