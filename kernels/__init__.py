"""Fused Triton kernels for the multi-teacher losses (installed as ``fastmt.kernels``).

Not written yet: every function here currently delegates to the reference in ``fastmt.losses``.
"""
