"""A kernel written the way ``kernels/kl.py`` once was: a plain float module global read inside
``@triton.jit``. Triton's interpreter runs it; Triton's compiler refuses it (NameError), which is what
the ahead-of-time build in ``tests/test_tools_aot.py`` must report."""

import triton
import triton.language as tl

_FLOOR = -1.0e30  # deliberately not a tl.constexpr


@triton.jit
def old_global_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(x_ptr + offs, tl.maximum(x, _FLOOR), mask=offs < n)
