"""One distillation step's forward: frozen teachers, then the student and the three losses.

The same two functions serve the eager reference and the compiled path (``--compile``): compiled,
each is one ``torch.compile(fullgraph=True)`` graph per input shape (batch rows x length bucket per
tokenizer; ``fastmt.engine.shapes`` counts them before step 1 and fits Dynamo's limits to them); with
``--cuda-graphs`` each is also recorded and replayed as a CUDA graph.
Backward and the optimizer step stay in ``fastmt.engine.loop``.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from fastmt import losses as reference_losses
from fastmt.engine.precision import PRECISIONS, autocast, compile_fn
from fastmt.models.hf import prepare_stock_class
from fastmt.models.stacked import make_stacked, teacher_groups


class DistillStep:
    """``step(inputs, labels) -> (loss, parts)`` for one batch; ``parts`` are detached loss terms."""

    def __init__(self, student, teachers, maps, args, losses_mod, device: torch.device, compile: bool = False):
        self.student, self.teachers, self.maps = student, teachers, maps
        self.student_call = student  # what the forward goes through (a DDP wrapper when data-parallel)
        self.args, self.losses, self.device = args, losses_mod, device
        self.use_teachers = args.alpha_kd > 0 or (args.hidden_loss != "none" and args.alpha_hidden > 0)
        self.want_hidden = args.hidden_loss != "none" and args.alpha_hidden > 0
        stack = getattr(args, "stack_teachers", False)
        if args.precision != "fp32" and self.use_teachers:
            # Frozen teachers keep their weights in the half dtype: half the memory, and autocast no
            # longer re-casts every teacher weight on every step. (The shared head stays fp32: tiny.)
            teachers.encoders.to(PRECISIONS[args.precision])
            teachers.adapters.to(PRECISIONS[args.precision])
        if compile:
            # Before stacking: the stacked module's template is a copy of a teacher, hooks included.
            install_output_hooks([student.encoder, *teachers.encoders], device)
        self.groups = teacher_groups(teachers) if stack else [(i,) for i in range(len(teachers))]
        impl = getattr(args, "stack_impl", "auto")
        self.stacked = {g: make_stacked(teachers, g, impl) for g in self.groups if len(g) > 1}
        self._teachers = self.teachers_forward
        self._student = self.student_loss
        # Frozen teachers' outputs stored per example (fastmt.cache.teachers), set by the distill command.
        self.cache = None
        self._kl_takes_lse = None  # whether the KL loss takes the teachers' log-sum-exps (read once)
        # Steps in which each teacher gave a non-finite logit, counted on the device (read when logging).
        self.teacher_faults = torch.zeros(len(teachers), dtype=torch.int64, device=device)
        # CUDA graphs: Inductor's graph trees record each compiled graph (teachers' forward, student
        # forward + loss, and its backward) once per length bucket into a static memory pool and
        # replay it with one launch; new inputs are copied into the recorded buffers.
        self.cuda_graphs = bool(getattr(args, "cuda_graphs", False)) and compile and device.type == "cuda"
        if compile:
            mode = "reduce-overhead" if self.cuda_graphs else None
            self._teachers = compile_fn(self.teachers_forward, mode)
            self._student = compile_fn(self.student_loss, mode)

    def teachers_forward(self, inputs):
        """Teacher logits ``[T,N,C]`` and, for the hidden loss, the mapped hidden states ``[T,K,N,S,D]``."""
        a = self.args
        outs = {}
        with autocast(self.device, a.precision):
            for group in self.groups:
                if len(group) > 1:
                    outs.update(self.stacked[group].forward(inputs[self.teachers.keys[group[0]]],
                                                            [self.maps[i] for i in group] if self.want_hidden else None))
                else:
                    i = group[0]
                    outs[i] = self.teachers.forward_teacher(i, inputs[self.teachers.keys[i]],
                                                            self.maps[i] if self.want_hidden else None)
            logits, hidden = [], []
            for i in range(len(self.teachers)):
                z, h = outs[i]
                logits.append(z)
                if self.want_hidden:
                    hidden.append(torch.stack([x[:, :1] if a.hidden_loss == "cls" else x for x in h]))
        return torch.stack(logits), (torch.stack(hidden) if self.want_hidden else None)

    def student_forward(self, inputs):
        """Student logits ``[N,C]`` and, for the hidden loss, its layers' hidden states ``[K,N,S,Ds]``."""
        with autocast(self.device, self.args.precision):
            return self.student_call(inputs[self.student.key], want_hidden=self.want_hidden)

    @property
    def takes_teacher_lse(self) -> bool:
        """Whether the KL loss reads the teachers' log-sum-exps from the cache (``teacher_lse``) rather
        than computing them: the fused losses do, for the per-teacher KL (not the averaged target)."""
        a = self.args
        if self._kl_takes_lse is None:  # once per run: not a signature read every step
            self._kl_takes_lse = "teacher_lse" in inspect.signature(self.losses.mt_kl_loss).parameters
        return self.cache is not None and a.alpha_kd > 0 and a.kd_target != "ensemble" and self._kl_takes_lse

    def losses_from(self, inputs, labels, s_logits, s_hidden, t_logits, t_hidden, scale=None, t_lse=None):
        """``a_task CE + a_kd L_kd + a_hid L_hid`` and the detached terms.

        ``scale`` (data-parallel only) is a ``[2]`` tensor: the weights of this process's means over
        rows and over tokens (``fastmt.engine.distributed.Shard``); each term, and its logged value, is
        multiplied by the one that matches its own mean. ``t_lse`` (from the teacher cache): the
        teachers' log-sum-exps, for a KL loss that takes them (``takes_teacher_lse``).
        """
        a, student = self.args, self.student
        by_rows = (lambda t: t) if scale is None else (lambda t: t * scale[0])
        by_tokens = (lambda t: t) if scale is None else (lambda t: t * scale[1])
        parts = {}
        task = by_rows(F.cross_entropy(s_logits.float(), labels))
        loss = a.alpha_task * task
        parts["task"] = task.detach()
        if t_logits is None:
            return loss, parts
        if a.alpha_kd > 0:
            # The scheme name lets the fused kernel compute the teacher weights in the same pass.
            if a.kd_target == "ensemble":
                # One target: the teachers' averaged logits, every example weighted alike.
                kd = self.losses.mt_kl_loss(s_logits, t_logits.mean(0, keepdim=True), weights="uniform",
                                            temperature=a.temperature, labels=labels)
            else:
                given = {} if t_lse is None else {"teacher_lse": t_lse}
                kd = self.losses.mt_kl_loss(s_logits, t_logits, weights=a.weighting, temperature=a.temperature,
                                            labels=labels, **given)
            kd = by_rows(kd)
            loss = loss + a.alpha_kd * kd
            parts["kd"] = kd.detach()
        if self.want_hidden:
            if a.hidden_loss == "cls":
                s_hidden, mask, by = s_hidden[:, :, :1], None, by_rows  # a mean over rows
            else:
                mask, by = inputs[student.key]["attention_mask"], by_tokens  # a mean over real tokens
            weights = reference_losses.teacher_weights(t_logits, labels, a.weighting) if a.weight_hidden else None
            hid = by(self.losses.mt_hidden_loss(s_hidden, t_hidden, student.proj_weight, student.proj_bias,
                                                mask=mask, weights=weights))
            loss = loss + a.alpha_hidden * hid
            parts["hidden"] = hid.detach()
        return loss, parts

    def student_loss(self, inputs, labels, t_logits, t_hidden, scale=None, t_lse=None):
        s_logits, s_hidden = self.student_forward(inputs)
        return self.losses_from(inputs, labels, s_logits, s_hidden, t_logits, t_hidden, scale, t_lse)

    def teacher_outputs(self, inputs):
        """Teachers' outputs as ordinary tensors (made without autograd, then copied out).

        The copy matters twice: tensors made in inference mode cannot be saved for backward, and
        under CUDA graphs the teachers' outputs live in the graph pool that the next replay reuses.
        Under CUDA graphs the teachers run under ``no_grad`` rather than inference mode: the graph
        trees share one memory pool between the teachers' graph and the student's training graphs,
        and graphs recorded in inference mode are a known trouble spot for them (PyTorch #135892).
        """
        if not self.use_teachers:
            return None, None
        with torch.no_grad() if self.cuda_graphs else torch.inference_mode():
            t_logits, t_hidden = self._teachers(inputs)
        t_logits = t_logits.clone()
        self.teacher_faults += (~torch.isfinite(t_logits)).flatten(1).any(1)
        return t_logits, (t_hidden.clone() if t_hidden is not None else None)

    def describe_faults(self) -> str:
        """One line on teachers whose logits were NaN or inf (empty when there were none)."""
        counts = self.teacher_faults.tolist()
        bad = [f"teacher {i} ({self.teachers.names[i]}) in {c} step(s)" for i, c in enumerate(counts) if c]
        return ("non-finite teacher logits: " + ", ".join(bad)) if bad else ""

    takes_index = True  # the training loop passes each batch's example positions (for the cache)

    def __call__(self, inputs, labels, index=None, shard=None):
        """``shard`` (a ``fastmt.engine.distributed.Shard``, data-parallel only) weighs this process's terms
        by its share of the global batch."""
        if self.cuda_graphs:
            # A new training step: outputs of the previous replay may be overwritten from here on.
            torch.compiler.cudagraph_mark_step_begin()
        t_logits, t_hidden, t_lse = self.cached_teacher_outputs(inputs, index)
        if shard is None:
            if t_lse is not None:
                return self._student(inputs, labels, t_logits, t_hidden, None, t_lse)
            return self._student(inputs, labels, t_logits, t_hidden)
        # A tensor, not Python floats: a compiled step is not specialised (recompiled) per value.
        scale = torch.tensor([shard.row_weight(), shard.token_weight(self.student.key)], dtype=torch.float32)
        return self._student(inputs, labels, t_logits, t_hidden, scale.to(self.device, non_blocking=True))

    def cached_teacher_outputs(self, inputs, index=None):
        """``(logits, hidden, lse)``: the teachers' outputs from the cache when every example of the
        batch is stored there, otherwise computed (and stored). ``lse`` is None unless the KL loss takes
        the teachers' log-sum-exps (``takes_teacher_lse``); then it is a tensor on every step, cached or
        not (one compiled graph, not two)."""
        cache = self.cache
        if cache is None or index is None or not self.use_teachers:
            return (*self.teacher_outputs(inputs), None)
        width = inputs[self.student.key]["input_ids"].shape[1]
        hit = cache.get(index, width, self.device)
        given = self.takes_teacher_lse
        if hit is not None:
            return hit if given else (*hit[:2], None)
        t_logits, t_hidden = self.teacher_outputs(inputs)
        t_lse = reference_losses.teacher_lse(t_logits, self.args.temperature)
        cache.put(index, t_logits, t_hidden, t_lse)
        return t_logits, t_hidden, (t_lse if given else None)


def install_output_hooks(encoders, device: torch.device) -> None:
    """Run each encoder once eagerly: transformers installs its hidden-state hooks on the first call,
    under a lock that dynamo cannot trace, so the compiled call must not be the first. Also build the
    classes that saving a run dir builds (``fastmt.models.hf.prepare_stock_class``): the compiled graphs guard
    on transformers' table of them, which must not grow after the first graph."""
    with torch.no_grad():
        for enc in encoders:
            prepare_stock_class(enc)
            was_training = enc.training
            enc.eval()  # no dropout: the warm-up must not consume random numbers
            ids = torch.zeros(1, 2, dtype=torch.long, device=device)
            enc(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
            enc.train(was_training)
