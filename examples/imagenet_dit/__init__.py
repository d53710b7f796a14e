"""ImageNet-256 DiT training with meanflow_losses: run as ``python -m examples.imagenet_dit.<script>``."""
