"""Knowledge distillation: a smaller student learns from a frozen, pretrained teacher.

It runs on the trainer (``pretrain.trainer.train``) unchanged: the same shards, masking,
DeepSpeed engine, checkpoints, resume and TensorBoard. Only the model differs: a
:class:`Student`, a ``BertForMaskedLM`` (Hugging Face names, so it exports like any checkpoint)
whose training forward also runs the teacher and returns

    loss = kd_weight * T^2 * KL(teacher_T || student_T) at masked positions
         + mlm_weight * cross-entropy against the true tokens
         + cos_weight * (1 - cosine(student hidden, teacher hidden)) over all positions
         + attn_weight * KL of the last layers' self-attention relations (MiniLM v2; off by default)

(DistilBERT's three terms). The teacher sits outside the engine: frozen, in eval mode, with no
optimizer state, not sharded, not saved in the student's checkpoints. When the widths match,
the student starts from the teacher (embeddings and head copied, and every other layer:
student layer i from teacher layer ``i * L_teacher // L_student``); otherwise it starts at
random and a learned projection maps its hidden states to the teacher's width for the
cosine term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from data_prep.errors import UserError
from pretrain import checkpoint as ckpt
from pretrain.config import PretrainConfig
from pretrain.model import BertForMaskedLM, ModelConfig, masked_positions


@dataclass
class DistillSection:
    """The teacher and the loss weights."""

    teacher: str = ""
    """The teacher: a pretraining run folder (its latest checkpoint), a checkpoint folder or an export folder."""

    temperature: float = field(default=2.0, metadata={"range": "(0, inf)"})
    """Softmax temperature of both distributions in the KD term (DistilBERT: 2)."""

    kd_weight: float = field(default=5.0, metadata={"range": "[0, inf)"})
    """Weight of the temperature-scaled KL term (DistilBERT: 5)."""

    mlm_weight: float = field(default=2.0, metadata={"range": "[0, inf)"})
    """Weight of the hard MLM cross-entropy (DistilBERT: 2)."""

    cos_weight: float = field(default=1.0, metadata={"range": "[0, inf)"})
    """Weight of the hidden-state cosine term (DistilBERT: 1)."""

    attn_weight: float = field(default=0.0, metadata={"range": "[0, inf)"})
    """Weight of the self-attention relation term (MiniLM v2: the softmax of query-query, key-key and
    value-value dot products in the last layer, KL to the teacher's, averaged); 0: off."""

    relation_heads: int = 0
    """Heads that term splits both widths into (it must divide both hidden sizes); 0: the student's."""

    init_from_teacher: bool = True
    """Start from the teacher's embeddings, head and every other layer when the shapes allow."""


@dataclass
class DistillConfig(PretrainConfig):
    """``bertforge distill``: pretraining's keys (``model`` is the student) plus ``distill``."""

    distill: DistillSection = field(default_factory=DistillSection)


def teacher_layers(teacher: int, student: int) -> list[int]:
    """Which teacher layer each student layer starts from (every other one for half the depth)."""
    return [i * teacher // student for i in range(student)]


class Student(BertForMaskedLM):
    """The student, with the frozen teacher beside it (not a submodule: no gradients, no optimizer
    state, not in the checkpoint)."""

    def __init__(self, cfg: ModelConfig, teacher: BertForMaskedLM, section: DistillSection) -> None:
        super().__init__(cfg)
        object.__setattr__(self, "teacher", teacher)  # unregistered on purpose
        self.relations: dict[tuple[str, str], torch.Tensor | None] = {}  # last-layer q, k, v; mask (attn_weight > 0)
        self._capturing = False  # True only inside a training forward (not in evaluation, nor in backward)
        if section.attn_weight > 0:
            self.relation_heads = relation_heads(section, cfg, teacher.config.hidden_size)
            for who, model in (("student", self), ("teacher", teacher)):
                # the projections the layer computes anyway: nothing computed twice
                attn = model.bert.encoder.layer[-1].attention.self
                for name in ("query", "key", "value"):
                    getattr(attn, name).register_forward_hook(partial(self._capture, (who, name)))
            # the padding mask, the same for both models (they read the same batch): the student's
            self.bert.encoder.layer[-1].attention.self.register_forward_hook(partial(self._capture, ("both", "mask")))
        self.section = section
        tw = teacher.config.hidden_size
        self.distill_projection = nn.Linear(cfg.hidden_size, tw, bias=False) if cfg.hidden_size != tw else None
        self.loss_terms: dict[str, torch.Tensor] = {}

    def _capture(self, key: tuple[str, str], module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        """Forward hook: keep a last-layer projection (or the attention's mask, its second argument)
        for the relation term; only during a training forward: evaluation has no use for them, and
        under activation checkpointing the backward's recomputation of the layer fires the hooks
        again, which must not keep a second copy until the next step."""
        if self._capturing:
            self.relations[key] = args[1] if key[1] == "mask" else out

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 - .to()/.bfloat16() reach the teacher too
        self.teacher._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, positions=None, labels=None):  # noqa: ANN001, ANN201
        if labels is None:
            return super().forward(input_ids, attention_mask, token_type_ids, positions)
        positions, rows = masked_positions(labels)  # padded: the head's matrices keep a few shapes
        target = labels.reshape(-1)[positions[:rows]]
        self._capturing = self.training  # (the hooks exist only when attn_weight > 0)
        try:
            hidden = self.bert(input_ids, attention_mask)
            with torch.no_grad():
                t_hidden = self.teacher.bert(input_ids, attention_mask)
        finally:
            self._capturing = False
        logits = self.cls.predictions(hidden.reshape(-1, hidden.shape[-1])[positions])[:rows].float()
        mlm = F.cross_entropy(logits, target)
        correct = (logits.argmax(-1) == target).sum()
        count = torch.tensor(rows, device=labels.device)
        with torch.no_grad():
            t_logits = self.teacher.cls.predictions(t_hidden.reshape(-1, t_hidden.shape[-1])[positions])[:rows].float()
        if not self.training:  # evaluation: the student's loss, and the teacher's accuracy beside it
            self.loss_terms = {"teacher_correct": (t_logits.argmax(-1) == target).sum()}
            return mlm, correct, count
        s = self.section
        temp = s.temperature
        kd = F.kl_div(F.log_softmax(logits / temp, -1), F.log_softmax(t_logits / temp, -1), log_target=True,
                      reduction="batchmean") * temp**2  # fmt: skip
        student_h = hidden if self.distill_projection is None else self.distill_projection(hidden)
        cos = (1 - F.cosine_similarity(student_h.float(), t_hidden.float(), dim=-1)).mean()
        loss = s.kd_weight * kd + s.mlm_weight * mlm + s.cos_weight * cos
        self.loss_terms = {
            "distill/kd_loss": kd.detach(),
            "distill/mlm_loss": mlm.detach(),
            "distill/cos_loss": cos.detach(),
        }
        if s.attn_weight > 0:
            attn = relation_loss(self.relations, self.relation_heads)
            self.relations.clear()  # autograd keeps what the backward needs
            loss = loss + s.attn_weight * attn
            self.loss_terms["distill/attn_loss"] = attn.detach()
        return loss, correct, count


def relation_heads(section: DistillSection, student: ModelConfig, teacher_width: int) -> int:
    """The relation heads of the attention term (``distill.relation_heads``, or the student's heads),
    refused unless they divide both hidden sizes."""
    if section.relation_heads < 0:
        raise UserError(
            f"config key 'distill.relation_heads': {section.relation_heads} is negative (0: the student's heads)"
        )
    heads = section.relation_heads or student.num_heads
    for who, width in (("student", student.hidden_size), ("teacher", teacher_width)):
        if width % heads:
            raise UserError(
                f"config key 'distill.relation_heads': {heads} does not divide the {who}'s hidden size {width}"
            )
    return heads


def relation_loss(captured: dict, heads: int) -> torch.Tensor:
    """MiniLM v2's self-attention relations: for each of query, key and value, the softmax over keys
    of the scaled dot products within ``heads`` relation heads; the teacher's to the student's KL,
    per query row, averaged over rows, heads and the three. Padded keys are masked out. ``captured``
    holds each model's last-layer projections, keyed ``(who, name)``, and the padding mask (or None),
    keyed ``("both", "mask")``."""
    mask = captured["both", "mask"]
    total = 0.0
    for proj in ("query", "key", "value"):
        rel = []
        for who in ("student", "teacher"):
            x = captured[who, proj]
            b, t, h = x.shape
            v = x.float().view(b, t, heads, h // heads).transpose(1, 2)
            scores = v @ v.transpose(-1, -2) / math.sqrt(h // heads)
            if mask is not None:
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            rel.append(F.log_softmax(scores, -1))
        total = total + F.kl_div(rel[0], rel[1], log_target=True, reduction="none").sum(-1).mean()
    return total / 3


def init_from(student: BertForMaskedLM, teacher: BertForMaskedLM) -> list[int] | None:
    """Copy the teacher's embeddings, head and chosen layers into the student where shapes match;
    returns the teacher layers used, or None when the widths differ (the student stays random)."""
    s, t = student.config, teacher.config
    if (s.hidden_size, s.intermediate_size, s.num_heads) != (t.hidden_size, t.intermediate_size, t.num_heads):
        return None
    if s.num_layers > t.num_layers or s.max_position > t.max_position:
        return None
    chosen = teacher_layers(t.num_layers, s.num_layers)
    with torch.no_grad():
        student.bert.embeddings.load_state_dict(teacher.bert.embeddings.state_dict())
        student.cls.load_state_dict(teacher.cls.state_dict())
        for i, j in enumerate(chosen):
            student.bert.encoder.layer[i].load_state_dict(teacher.bert.encoder.layer[j].state_dict())
        if student.bert.encoder.final_layer_norm is not None and teacher.bert.encoder.final_layer_norm is not None:
            student.bert.encoder.final_layer_norm.load_state_dict(teacher.bert.encoder.final_layer_norm.state_dict())
    return chosen


def check_teacher(cfg: DistillConfig) -> None:
    """Refuse a missing teacher, one whose tokenizer is not the data's, or relation heads that do not
    divide both widths (no weights are loaded)."""
    from data_prep import manifest as manifests
    from data_prep import tokenizer as tokenizers
    from pretrain.export import describe

    if not cfg.distill.teacher:
        raise UserError("config key 'distill.teacher' is empty: give a run, checkpoint or export folder")
    shape, tok = describe(Path(cfg.distill.teacher))
    if cfg.distill.attn_weight > 0:
        relation_heads(cfg.distill, cfg.model, shape["hidden_size"])
    man = manifests.load(cfg.data.path)
    if shape["vocab_size"] != man["tokenizer"]["vocab_size"] or (
        tok.is_file() and tokenizers.sha256(tok) != man["tokenizer"]["sha256"]
    ):
        raise UserError(
            f"{Path(cfg.data.path) / manifests.MANIFEST}: field 'tokenizer.sha256' differs from the teacher's tokenizer "
            f"({cfg.distill.teacher}): teacher and student must share one tokenizer (config key 'distill.teacher')"
        )


def load_teacher(cfg: DistillConfig, rank: int, device: torch.device) -> BertForMaskedLM:
    """The checked teacher, frozen and in eval mode, read by rank 0 alone (a collective)."""
    from pretrain import engine
    from pretrain.export import load_any

    # again on the node, by rank 0: a SLURM job may start hours after the login node's check
    ckpt.on_rank_0(lambda: check_teacher(cfg), rank, device, "which refused the teacher")
    teacher = engine.first_rank_model(lambda: load_any(Path(cfg.distill.teacher))[0], rank, device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def build_student(cfg: DistillConfig, device: torch.device) -> Student:
    """The trainer's ``build_model`` for distillation (weights the same on every rank: the seed is set)."""
    teacher = load_teacher(cfg, dist.get_rank(), device)
    student = Student(cfg.model, teacher.to(device), cfg.distill)
    if cfg.distill.init_from_teacher:
        init_from(student, teacher)
    return student
