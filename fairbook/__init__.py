"""fairbook: a notebook-first research handbook on fairness in medical vision-language models."""
__version__ = "0.1.0"
