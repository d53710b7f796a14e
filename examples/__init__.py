"""Runnable examples for meanflow_losses (not part of the installed package)."""
