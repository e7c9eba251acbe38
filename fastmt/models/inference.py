"""A model over a whole set, batch by batch: every teacher's logits, or the student's (float32, on the CPU)."""

from __future__ import annotations

import time

import torch

from fastmt.data.dataset import Encoded, iterate_batches, to_device
from fastmt.engine.precision import autocast
from fastmt.models.classifier import Student, Teachers


@torch.inference_mode()
def teacher_logits(teachers: Teachers, enc: dict[str, Encoded], n: int, batch_size: int, buckets, device, precision="fp32",
                   timings: list[float] | None = None) -> torch.Tensor:
    """Logits of every teacher over a whole set: ``[T, n, C]`` (float32, on the CPU).

    When ``timings`` is a list, the seconds each teacher spent are added into it (one entry per teacher).
    """
    teachers.eval()
    out = torch.empty(len(teachers), n, teachers.num_labels)
    if timings is not None:
        timings[:] = [0.0] * len(teachers)
    for batch in iterate_batches(enc, [0] * n, batch_size, buckets, shuffle=False, group_by_length=True):
        inputs = to_device(batch.inputs, device)
        for i, key in enumerate(teachers.keys):
            t0 = time.perf_counter()
            with autocast(device, precision):
                logits, _ = teachers.forward_teacher(i, inputs[key])
            out[i, batch.index] = logits.float().cpu()
            if timings is not None:
                timings[i] += time.perf_counter() - t0
    return out


@torch.inference_mode()
def student_logits(student: Student, enc: dict[str, Encoded], n: int, batch_size: int, buckets, device, precision="fp32") -> torch.Tensor:
    student.eval()
    out = torch.empty(n, student.num_labels)
    for batch in iterate_batches({student.key: enc[student.key]}, [0] * n, batch_size, buckets, shuffle=False,
                                 group_by_length=True):
        with autocast(device, precision):
            logits, _ = student(to_device(batch.inputs, device)[student.key])
        out[batch.index] = logits.float().cpu()
    return out
