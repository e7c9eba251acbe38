"""fastmt: multi-teacher distillation (MT-BERT) for text classification and causal language models.

The package in wings: ``engine`` (the loop and what keeps a run alive), ``config`` (every command's
settings and the one ``auto`` resolver), ``data``, ``cache``, ``models``, ``tasks`` (classification,
causal LM), ``serve``, ``tools``; ``losses`` is the reference every fast path is checked against and
``kernels`` the fused Triton kernels (the repo's top-level ``kernels/`` folder).
"""

__version__ = "0.1.0"
