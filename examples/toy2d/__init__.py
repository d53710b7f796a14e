"""Toy 2-D example: datasets, a small MLP velocity network, metrics, a trainer, figures and the study."""
