"""Run ``fastmt.train.distill`` for each entry of a JSON list of ``DistillArgs`` keyword arguments.

Launched under torchrun by tests/test_engine_distributed.py: several runs share one launch (one process
group), which costs far less than one launch per run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastmt.config.settings import DistillArgs
from fastmt.tasks.classification.distill import distill  # noqa: E402

if __name__ == "__main__":
    for kw in json.loads(Path(sys.argv[1]).read_text()):
        distill(DistillArgs(**kw))
