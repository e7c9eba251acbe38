"""A fastmt classifier for transformers: an encoder, the pooling it was trained with, and its head.

fastmt saves this file into each model dir whose head no stock transformers class computes (mean
pooling, an adapter wider than its encoder, an architecture without a stock classification head),
and names it in the dir's config.json (``auto_map``), so that

    AutoModelForSequenceClassification.from_pretrained(d, trust_remote_code=True)
    pipeline("text-classification", model=d, trust_remote_code=True)

give the logits fastmt gives, offline and without fastmt installed: it imports torch and
transformers only. The forward is fastmt's: ``classifier(tanh(dense(adapter(pool(h)))))`` where
``pool`` reads the first token (``cls``) or averages the real tokens (``mean``), and ``adapter`` is
the linear map a teacher of another width feeds the shared head through (absent otherwise).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

MODEL_TYPE = "fastmt-classifier"


class FastmtClassifierConfig(PretrainedConfig):
    """``encoder``: the encoder's own config as a dict (with its ``model_type``); ``pooling``: ``cls`` or
    ``mean``; ``adapter_in``: the encoder's width when an adapter maps it to ``head_size`` (else None);
    ``head_size``: the head's width (the encoder's when None)."""

    model_type = MODEL_TYPE

    def __init__(self, encoder: dict | None = None, pooling: str = "cls", adapter_in: int | None = None,
                 head_size: int | None = None, head_dropout: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.encoder = dict(encoder or {})
        self.pooling = pooling
        self.adapter_in = adapter_in
        self.head_size = head_size
        self.head_dropout = head_dropout


def _encoder(config: FastmtClassifierConfig) -> nn.Module:
    settings = dict(config.encoder)
    inner = AutoConfig.for_model(settings.pop("model_type"), **settings)
    try:
        return AutoModel.from_config(inner, add_pooling_layer=False)
    except TypeError:  # encoders without a pooler of their own
        return AutoModel.from_config(inner)


class FastmtForSequenceClassification(PreTrainedModel):
    config_class = FastmtClassifierConfig
    base_model_prefix = "encoder"
    main_input_name = "input_ids"

    def __init__(self, config: FastmtClassifierConfig):
        super().__init__(config)
        if config.pooling not in ("cls", "mean"):
            raise ValueError(f"pooling {config.pooling!r}: this file knows cls and mean")
        self.encoder = _encoder(config)
        width = int(self.encoder.config.hidden_size)
        size = int(config.head_size or width)
        self.adapter = nn.Linear(int(config.adapter_in), size) if config.adapter_in else None
        self.dense = nn.Linear(size, size)
        self.dropout = nn.Dropout(config.head_dropout)
        self.classifier = nn.Linear(size, config.num_labels)
        self.post_init()

    def _init_weights(self, module):
        # Every weight is in the dir; what a fresh model starts from only matters for from_config.
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    def pool(self, last: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if self.config.pooling == "cls" or attention_mask is None:
            return last[:, 0] if self.config.pooling == "cls" else last.mean(1)
        m = attention_mask.to(last.dtype).unsqueeze(-1)
        return (last * m).sum(1) / m.sum(1).clamp_min(1.0)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, inputs_embeds=None,
                output_hidden_states=None, output_attentions=None, return_dict=None, **kwargs):
        extra = {}
        if token_type_ids is not None and int(getattr(self.encoder.config, "type_vocab_size", 0) or 0) > 1:
            extra["token_type_ids"] = token_type_ids
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                           output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                           return_dict=True, **extra)
        pooled = self.pool(out.last_hidden_state, attention_mask)
        if self.adapter is not None:
            pooled = self.adapter(pooled)
        logits = self.classifier(self.dropout(torch.tanh(self.dense(pooled))))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.float().view(-1, self.config.num_labels), labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                        attentions=out.attentions)
