"""Causal language models: a small LM distilled from several that share its tokenizer."""
