"""The ``distill-lm`` step on live teachers: ``a_task CE + a_kd L_kd + a_hid L_hid`` on one batch of
packed blocks (``fastmt.tasks.lm.cached`` holds the step on stored teachers)."""

from __future__ import annotations

import torch

from fastmt.config.settings import DistillLMArgs
from fastmt.data.packed import next_tokens
from fastmt.engine.precision import autocast
from fastmt.kernels.lm_common import stack_teachers
from fastmt.models.causal_lm import LMStudent
from fastmt.tasks.lm.common import KEY, backbone, chunked_ce, compiled_bodies


class LMStep:
    """``step(inputs, labels) -> (loss, parts)``: one batch of blocks through the teachers (no gradient)
    and the student, the three losses."""

    def __init__(self, student: LMStudent, teachers: list, args: DistillLMArgs, losses, device: torch.device,
                 maps: list[list[int]]):
        self.student, self.teachers, self.args, self.losses, self.device = student, teachers, args, losses, device
        self.maps = maps  # per teacher, the teacher layer each student layer learns (hidden loss)
        self.bodies = compiled_bodies([*teachers, student.model]) if args.compile else None
        self.want_kd = args.alpha_kd > 0
        self.want_hidden = args.alpha_hidden > 0
        heads = [t.get_output_embeddings().weight.detach() for t in teachers]
        self.ensemble = args.kd_target == "ensemble"
        if self.ensemble:
            # The teachers' mean logits sum_i (h_i / T) W_i^T are one teacher's: hidden states and output
            # matrices side by side along the width, the states divided by T. Still no tokens x vocab.
            self.t_heads = torch.cat(heads, dim=1)[None]
        else:
            self.t_heads = stack_teachers(heads) if len({h.shape[1] for h in heads}) == 1 else heads
        if args.precision in ("bf16", "fp16") and isinstance(self.t_heads, torch.Tensor):
            # Under autocast the teachers' states come in half precision; their output matrices are cast
            # once here, not on every step inside the loss.
            self.t_heads = self.t_heads.to(torch.bfloat16 if args.precision == "bf16" else torch.float16)

    def __call__(self, inputs, labels):
        x = inputs[KEY]
        ids, mask = x["input_ids"], x["attention_mask"]
        targets = next_tokens(ids, mask).reshape(-1)
        a = self.args
        with autocast(self.device, a.precision):
            t_out = []
            if self.want_kd or self.want_hidden:
                with torch.no_grad():
                    t_out = [backbone(t, ids, mask, self.want_hidden, self.bodies) for t in self.teachers]
            s_out = backbone(self.student.model, ids, mask, self.want_hidden, self.bodies)
            h = s_out.last_hidden_state.reshape(-1, s_out.last_hidden_state.shape[-1])
            w = self.student.model.get_output_embeddings().weight
            nll, _, count = chunked_ce(h, w, targets)
            task = nll / count.clamp_min(1)
            loss = a.alpha_task * task
            parts = {"task": task.detach()}
            if self.want_kd:
                t_h = [o.last_hidden_state.reshape(h.shape[0], -1) for o in t_out]
                if self.ensemble:
                    t_h, weighting = (torch.cat(t_h, dim=1) / len(t_h))[None], "uniform"
                else:
                    t_h = torch.stack(t_h) if isinstance(self.t_heads, torch.Tensor) else t_h
                    weighting = a.weighting
                kd = self.losses.lm_linear_kl_loss(h, w, t_h, self.t_heads, targets, weighting, a.temperature,
                                                   direction=a.direction)
                loss = loss + a.alpha_kd * kd
                parts["kd"] = kd.detach()
            if self.want_hidden:
                s_layers = torch.stack([s_out.hidden_states[k + 1] for k in range(len(self.maps[0]))])
                t_layers = torch.stack([torch.stack([o.hidden_states[m] for m in mp]) for o, mp in zip(t_out, self.maps)])
                hid = self.losses.mt_hidden_loss(s_layers, t_layers, self.student.proj_weight, self.student.proj_bias,
                                                 mask)
                loss = loss + a.alpha_hidden * hid
                parts["hidden"] = hid.detach()
        return loss, parts
