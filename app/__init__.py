"""Temper: train, compress, register and serve models on Ray."""
