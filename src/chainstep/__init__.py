"""chainstep: chain-of-step reasoning for vision-language models with step-level rewards."""

__version__ = "0.1.0"
