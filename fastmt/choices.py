"""The names each setting may take, spelled once: the settings (``fastmt.config``) check a run's values
and build the command line's ``choices`` from them, and the code that implements each name reads the same
tuple (``fastmt.losses``, ``fastmt.metrics``, ``fastmt.engine.precision``, ``fastmt.engine.tracking``,
``fastmt.models.classifier``).

It sits at the bottom of the package and imports nothing, so that ``fastmt --help``, which builds
every command's flags from the settings, loads no torch.
"""

from __future__ import annotations

AUTO = "auto"  # a setting left for fastmt.config.auto to choose, once the data and the device are known

PRECISIONS = ("fp32", "fp16", "bf16")  # --precision: the dtype of autocast (fp32: none)
SCHEMES = ("paper", "softmax", "uniform")  # --weighting: the per-example teacher weights
DIRECTIONS = ("forward", "reverse")  # --direction: KL(teacher || student) or KL(student || teacher)
KD_TARGETS = ("teachers", "ensemble")  # --kd-target: a KL term per teacher, or one to their averaged logits
HIDDEN_LOSSES = ("tokens", "cls", "none")  # --hidden-loss: every token's states, the first token's, or none
KERNELS = ("fused", "reference")  # --kernels: fastmt.kernels or fastmt.losses
METRICS = ("accuracy", "f1", "mcc")  # --metric: the dev score that picks the best epoch
TRACKERS = ("none", "tensorboard")  # --report-to
POOLINGS = ("cls", "mean")  # --pooling: what the shared head reads
