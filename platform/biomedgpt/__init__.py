"""BiomedGPT platform: pretrain, fine-tune, evaluate and serve BiomedGPT on Ray."""

__version__ = "0.1.0"
