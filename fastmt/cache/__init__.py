"""Frozen teachers computed once and read back: the store both caches are built on (``store``), the
classification layout (``teachers``) and the causal-LM top-k layout (``topk``)."""
