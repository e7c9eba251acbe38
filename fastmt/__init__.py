"""fastmt: multi-teacher distillation (MT-BERT) for text classification."""

__version__ = "0.1.0"
