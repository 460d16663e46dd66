"""Bastion: an inference-time defense sidecar for Open Inference Protocol model servers."""
__version__ = "0.1.0"
