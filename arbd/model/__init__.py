"""Models: plain PyTorch modules with no collective calls (parallelism is applied separately)."""
