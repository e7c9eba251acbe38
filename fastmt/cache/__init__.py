"""Frozen teachers computed once and read back: the classification layout and the causal-LM top-k layout."""
