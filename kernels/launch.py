"""One kernel launch, decided in full before it runs: what both kernel files' launchers return.

The launchers (``fastmt.kernels.kl``, ``fastmt.kernels.hidden_mse``) compute a :class:`Launch` from
their inputs and call it; the ahead-of-time build (``fastmt.tools.aot``) specializes and compiles
exactly the same arguments, so what is built and what runs cannot drift apart.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class Launch(NamedTuple):
    kernel: Any  # the @triton.jit function
    grid: tuple[int, ...]
    args: tuple  # positional, in the kernel's parameter order
    constexprs: dict[str, Any]
    num_warps: int
    options: dict[str, Any] | None = None  # further Triton compile options (ptx_options, ...)

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps, **(self.options or {}))
