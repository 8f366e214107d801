"""A BERT encoder for masked-language modelling. Imports torch only.

Parameter names follow Hugging Face's ``BertForMaskedLM`` (``bert.embeddings.*``,
``bert.encoder.layer.N.attention.self.query``, ``cls.predictions.*``), so that export is a
mapping, not a rewrite. Attention goes through ``F.scaled_dot_product_attention`` (flash and
memory-efficient kernels) on GPUs and under ``torch.compile``/export; on CPUs a plain
matmul-softmax-matmul, which trains 2.5x faster there in bf16 than SDPA's CPU kernels. The
input and output embeddings are tied; the MLM head projects onto the vocabulary only at the
positions asked for (the masked ones, 15% of tokens) rather than at every position; and
dropout on CPUs draws its masks several times faster than ``F.dropout`` (:func:`cpu_dropout`,
with numpy's generator where numpy is installed, as it always is with bertforge; without it,
the same dropout from torch's own generator, slower).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # label of a position that is not predicted (as in torch's cross_entropy)


@dataclass
class ModelConfig:
    """The encoder's shape; ``vocab_size`` comes from the dataset's manifest."""

    vocab_size: int = field(default=0, metadata={"range": "[0, inf)"})
    """Pieces in the tokenizer's vocabulary; 0 takes the dataset manifest's ``tokenizer.vocab_size``
    (a value given here must agree with it)."""

    hidden_size: int = field(default=768, metadata={"range": "[1, inf)"})
    """Width of every layer (BERT-base: 768)."""

    num_layers: int = field(default=12, metadata={"range": "[1, inf)"})
    """Transformer layers (BERT-base: 12)."""

    num_heads: int = field(default=12, metadata={"range": "[1, inf)"})
    """Attention heads; ``hidden_size`` must divide by it (BERT-base: 12 heads of 64)."""

    intermediate_size: int = field(default=3072, metadata={"range": "[1, inf)"})
    """Width of the feed-forward layer (BERT: 4 x hidden)."""

    max_position: int = field(default=512, metadata={"range": "[1, inf)"})
    """Learned position embeddings, the longest sequence the model can take."""

    type_vocab_size: int = field(default=2, metadata={"range": "[1, inf)"})
    """Segment (token type) embeddings: 2, as in BERT, so sentence-pair tasks can fine-tune."""

    dropout: float = field(default=0.1, metadata={"range": "[0, 1)"})
    """Dropout on embeddings, attention output and feed-forward output (BERT: 0.1)."""

    attention_dropout: float = field(default=0.0, metadata={"range": "[0, 1)"})
    """Dropout on attention probabilities (BERT: 0.1; MosaicBERT: 0.0, as here: it costs a random
    draw per score, ``heads x seq^2`` per sequence, and pretraining does not need it)."""

    pre_ln: bool = False
    """LayerNorm before each sublayer (more stable at depth) instead of BERT's after."""

    layer_norm_eps: float = field(default=1e-12, metadata={"range": "(0, inf)"})
    """BERT's LayerNorm epsilon."""

    initializer_range: float = field(default=0.02, metadata={"range": "[0, inf)"})
    """Standard deviation of the normal initialisation (BERT: 0.02)."""

    def __post_init__(self) -> None:  # (the ranges above: bertforge's config loader checks them)
        if self.num_heads > 0 and self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size {self.hidden_size} does not divide by model.num_heads {self.num_heads}"
            )


_INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}


@functools.cache
def _scale_bits(p: float, dtype: torch.dtype) -> int:
    """The bit pattern of ``1/(1-p)`` in ``dtype``, read as its same-width integer."""
    return torch.tensor(1.0 / (1.0 - p), dtype=dtype).view(_INT_OF_SIZE[dtype.itemsize]).item()


@functools.cache
def _numpy():  # noqa: ANN202
    """numpy, if installed (a dependency of bertforge, not of this module): its generator draws
    dropout's bits 2.3x as fast as torch's."""
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def _keep_flags(n: int, drop: int, seed: int) -> torch.Tensor:
    """``n`` booleans, each True with probability ``1 - drop/65536``: 16-bit uniforms (four per
    64 random bits) compared with ``drop``, the bits from numpy's SFC64 seeded with ``seed``, or,
    without numpy, from a torch generator seeded with it (another stream of the same law)."""
    np = _numpy()
    if np is None:  # torch compares no uint16: int16 lanes, uniform on [-32768, 32767], shifted
        bits = torch.empty(-(-n // 4), dtype=torch.int64).random_(
            -(2**63), None, generator=torch.Generator().manual_seed(seed)
        )
        return bits.view(torch.int16)[:n] >= drop - 32768
    bits = np.random.SFC64(seed).random_raw(-(-n // 4))
    return torch.from_numpy(bits.view(np.uint16)[:n] >= drop)


def _dropout_scale(shape: torch.Size, p: float, dtype: torch.dtype) -> torch.Tensor:
    """Dropout's multiplier in ``dtype``: ``1/(1-p)`` where kept, 0 where dropped, with P(keep) =
    1 - p quantised to 1/65536, from 16-bit uniforms seeded by one draw of torch's generator.

    Built as integers and viewed as ``dtype``: the keep flags times the bit pattern of
    ``1/(1-p)`` (torch's bool-to-bf16 conversion alone took longer than drawing the bits)."""
    seed = int(torch.empty((), dtype=torch.int64).random_())  # one draw of torch's generator
    drop = min(round(p * 65536), 65535)  # of the 65536 values a uniform takes, how many drop
    keep = _keep_flags(math.prod(shape), drop, seed).view(torch.uint8)
    return keep.to(_INT_OF_SIZE[dtype.itemsize]).mul_(_scale_bits(p, dtype)).view(dtype).view(shape)


class _CpuDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p):  # noqa: ANN001, ANN205
        scale = _dropout_scale(x.shape, p, x.dtype)
        ctx.save_for_backward(scale)
        return x * scale

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        (scale,) = ctx.saved_tensors
        return grad * scale, None


def cpu_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout (training mode) for CPU tensors, several times faster than ``F.dropout`` there.

    torch's CPU Bernoulli draws one number per element from a serial generator (MT19937), and
    dropout was the largest cost of a CPU training step after the matrix products. Here one
    draw of torch's generator seeds numpy's SFC64, whose raw 64-bit outputs give four
    independent 16-bit uniforms each (without numpy, a torch generator draws them, 2.3x
    slower), so the keep probability is quantised to 1/65536 (p=0.1 drops 6554/65536); the
    multiplier (``1/(1-p)`` or 0) is formed as integers and viewed as
    the tensor's dtype (:func:`_dropout_scale`). Forward and backward of 1M bf16 elements take
    1.2-1.3 ms on 2 cores, against 2.2 for the same masks made as booleans and converted and
    7-9 ms for ``F.dropout``. The seed comes from torch's generator, so seeding, checkpointed
    RNG states and activation recomputation reproduce the masks exactly."""
    return _CpuDropout.apply(x, p)


class Dropout(nn.Dropout):
    """``nn.Dropout`` that takes :func:`cpu_dropout` for CPU tensors in training."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and 0.0 < self.p < 1.0 and x.device.type == "cpu" and not torch.compiler.is_compiling():
            return cpu_dropout(x, self.p)
        return super().forward(x)


class Embeddings(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]  # all segment 0: no gather needed
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout_p = cfg.attention_dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, t, h = x.shape

        def heads(proj: nn.Linear) -> torch.Tensor:
            return proj(x).view(b, t, self.num_heads, h // self.num_heads).transpose(1, 2)

        q, k, v = heads(self.query), heads(self.key), heads(self.value)
        p = self.dropout_p if self.training else 0.0
        if x.device.type == "cpu" and not torch.compiler.is_compiling() and not torch.compiler.is_exporting():
            # SDPA's CPU kernels are slower at BERT's lengths: 2.5x this path's forward + backward
            # in bf16 (the math kernel computes in fp32 and guards fully masked rows; the flash
            # kernel's backward is slower still); in fp32 the two are even
            scores = torch.matmul(q, k.transpose(-1, -2)).mul_(1.0 / math.sqrt(q.shape[-1]))
            if mask is not None:
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            probs = scores.softmax(-1)
            out = (cpu_dropout(probs, p) if p > 0 else probs) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return out.transpose(1, 2).reshape(b, t, h)


class SelfOutput(nn.Module):
    def __init__(self, cfg: ModelConfig, in_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(in_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.dropout)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self = SelfAttention(cfg)
        self.output = SelfOutput(cfg, cfg.hidden_size)


class Intermediate(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)


class Layer(nn.Module):
    """One transformer layer; post-LN (BERT) or pre-LN, with the same parameters either way."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.pre_ln = cfg.pre_ln
        self.attention = Attention(cfg)
        self.intermediate = Intermediate(cfg)
        self.output = SelfOutput(cfg, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        att, ffn_in, ffn_out = self.attention.output, self.intermediate, self.output
        if self.pre_ln:
            x = x + att.dropout(att.dense(self.attention.self(att.LayerNorm(x), mask)))
            return x + ffn_out.dropout(ffn_out.dense(F.gelu(ffn_in.dense(ffn_out.LayerNorm(x)))))
        x = att.LayerNorm(x + att.dropout(att.dense(self.attention.self(x, mask))))
        return ffn_out.LayerNorm(x + ffn_out.dropout(ffn_out.dense(F.gelu(ffn_in.dense(x)))))


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))
        # pre-LN needs a final norm; post-LN ends normalised already
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if cfg.pre_ln else None
        self.activation_checkpointing = False  # recompute each layer in backward (set by the trainer)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layer:
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, mask, use_reentrant=False)
            else:
                x = layer(x, mask)
        return x if self.final_layer_norm is None else self.final_layer_norm(x)


class BertModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states ``(batch, seq, hidden)``; ``attention_mask`` is 1 for real tokens, 0 for padding."""
        mask = None
        exporting = torch.compiler.is_exporting()  # (torch.export/ONNX: no data-dependent branch)
        if attention_mask is not None and (
            exporting or not bool(attention_mask.all())
        ):  # .all() syncs; packed data has no pad
            mask = attention_mask[:, None, None, :].bool()  # broadcast over heads and queries
        return self.encoder(self.embeddings(input_ids, token_type_ids), mask)


class PredictionHeadTransform(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T + bias`` against ``target`` over the first
    ``rows`` rows (the rest are bucket padding: no loss, no gradient), and the number of those
    rows whose target has the top logit. The softmax runs over row chunks small enough to stay
    in cache, in fp32 whatever the parameters' dtype; its gradient (softmax minus one-hot) is
    taken in the same pass, so the ``(rows, vocab)`` logits are never kept in fp32 and the
    backward pass only scales what the forward computed."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, chunk, rows):  # noqa: ANN001, ANN205
        grads = any(ctx.needs_input_grad[:3])
        logits = hidden @ weight.t()  # (rows, vocab) in the parameters' dtype; the bias is added per chunk
        bias32 = bias.float()
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        fp32 = logits.dtype == torch.float32
        # one fp32 buffer for every chunk (unless the logits are fp32 already: then in place)
        buf = None if fp32 else torch.empty((chunk, logits.shape[1]), dtype=torch.float32, device=logits.device)
        for start in range(0, rows, chunk):
            end = min(start + chunk, rows)
            part, t = logits[start:end], target[start:end, None]
            # fp32 logits of the chunk, bias included: a conversion, then a same-dtype add (torch's
            # mixed bf16 + fp32 add takes 3x as long)
            z = part.add_(bias32) if fp32 else buf[: end - start].copy_(part).add_(bias32)
            picked = z.gather(1, t)
            top = z.amax(1, keepdim=True)
            correct += (picked >= top).sum()
            # torch's fused softmax (its exp is faster than torch.exp's); the log-sum-exp comes from
            # the top logit's probability, which is at least 1/vocab, so its log cannot underflow
            probs = torch.softmax(z, 1)
            loss += (top - probs.amax(1, keepdim=True).log() - picked).sum()
            if grads:
                probs.mul_(1.0 / rows)  # softmax / rows: the gradient of the mean...
                probs.scatter_add_(1, t, torch.full_like(picked, -1.0 / rows))  # ...minus the one-hot
                grad_b += probs.sum(0)
                part.copy_(probs)  # the logits' own memory now holds their gradient
        if grads:
            logits[rows:].zero_()
            ctx.save_for_backward(hidden, weight, logits, grad_b.to(bias.dtype))
        return loss / rows, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):  # noqa: ANN001, ANN205
        hidden, weight, grad_logits, grad_b = ctx.saved_tensors
        if grad_loss.item() != 1.0:  # fp16 loss scaling, or a scaled loss
            grad_logits = grad_logits * grad_loss.to(grad_logits.dtype)
            grad_b = grad_b * grad_loss.to(grad_b.dtype)
        return grad_logits @ weight, grad_logits.t() @ hidden, grad_b, None, None, None


class Decoder(nn.Linear):
    """The vocabulary projection (its weight tied to the word embeddings). Given targets it
    returns ``(mean cross-entropy, correct)`` through :class:`_LinearCrossEntropy` instead of
    logits. A module call, so that ZeRO 3 gathers the weight around it."""

    chunk = 32  # rows per softmax pass: 32 x 32k fp32 logits, 4 MB, stay in cache

    def forward(  # noqa: ANN201
        self, hidden: torch.Tensor, bias: torch.Tensor, target: torch.Tensor | None = None, rows: int | None = None
    ):
        if target is None:
            return F.linear(hidden, self.weight, bias)
        return _LinearCrossEntropy.apply(
            hidden, self.weight, bias, target, self.chunk, hidden.shape[0] if rows is None else rows
        )


class LMPredictionHead(nn.Module):
    def __init__(self, cfg: ModelConfig, embeddings: nn.Embedding) -> None:
        super().__init__()
        self.transform = PredictionHeadTransform(cfg)
        self.decoder = Decoder(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.decoder.weight = embeddings.weight  # tied input and output embeddings
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, hidden: torch.Tensor, target: torch.Tensor | None = None, rows: int | None = None):  # noqa: ANN201
        """Logits, or with ``target`` the ``(loss, correct)`` of :class:`Decoder` over the first ``rows``."""
        t = self.transform
        return self.decoder(t.LayerNorm(F.gelu(t.dense(hidden))), self.bias, target, rows)


class MLMHeads(nn.Module):
    def __init__(self, cfg: ModelConfig, embeddings: nn.Embedding) -> None:
        super().__init__()
        self.predictions = LMPredictionHead(cfg, embeddings)


def init_weights(model: nn.Module, std: float) -> None:
    """BERT's initialisation: normal(0, std) matrices and embeddings, zero biases, unit LayerNorms."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class BertForMaskedLM(nn.Module):
    """The encoder with its MLM head, named as in Hugging Face (``bert.*``, ``cls.*``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("model.vocab_size must be set (the trainer takes it from the dataset manifest)")
        self.config = cfg
        self.bert = BertModel(cfg)
        self.cls = MLMHeads(cfg, self.bert.embeddings.word_embeddings)
        init_weights(self, cfg.initializer_range)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Vocabulary logits: ``(n, vocab)`` at the flat ``positions`` (indices into batch x seq)
        if given, else ``(batch, seq, vocab)`` at every position. With ``labels``, the training
        step's ``(loss, correct, count)`` of :meth:`forward_loss` instead (the DeepSpeed engine
        calls this method, so the loss goes through it)."""
        if labels is not None:
            return self.forward_loss(input_ids, labels, attention_mask)
        hidden = self.bert(input_ids, attention_mask, token_type_ids)
        if positions is None:
            return self.cls.predictions(hidden)
        return self.cls.predictions(hidden.reshape(-1, hidden.shape[-1])[positions])

    def forward_loss(
        self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean MLM cross-entropy over the positions whose label is not ``IGNORE_INDEX``.

        Returns ``(loss, correct, count)``: the loss, and the number of right predictions and of
        predicted positions (tensors, so that reading them costs no device sync here).
        """
        positions, rows = masked_positions(labels)
        hidden = self.bert(input_ids, attention_mask)
        target = labels.reshape(-1)[positions]
        loss, correct = self.cls.predictions(hidden.reshape(-1, hidden.shape[-1])[positions], target, rows)
        return loss, correct, torch.tensor(rows, device=labels.device)


ROW_BUCKET = 32
"""Predicted rows are padded to a multiple of this (see :func:`masked_positions`)."""


def masked_positions(labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The flat indices of the positions to predict (label not ``IGNORE_INDEX``), padded with
    index 0 to a multiple of :data:`ROW_BUCKET`, and how many are real (the first ones).

    The number of masked tokens differs from batch to batch; unpadded, every new count is a
    new matrix shape for the head, and oneDNN (torch's bf16 matmul on CPUs) compiles and caches
    a kernel per shape: a rank's memory grew by a gigabyte over a few hundred steps. Padded,
    a run sees a handful of shapes, for at most ``ROW_BUCKET - 1`` extra rows of head work."""
    positions = (labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)  # syncs: a data-dependent size
    rows = len(positions)
    pad = -rows % ROW_BUCKET
    return (F.pad(positions, (0, pad)) if pad else positions), rows


def num_parameters(model: nn.Module) -> int:
    """Parameters, counting the tied embedding once (under ZeRO 3, whose ranks each hold a slice of
    every parameter, the whole: DeepSpeed keeps it as ``ds_numel``)."""
    return sum(getattr(p, "ds_numel", None) or p.numel() for p in {id(p): p for p in model.parameters()}.values())


def flops_per_token(cfg: ModelConfig, seq_len: int, mask_fraction: float) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward, 2 FLOPs per multiply-add),
    counting the vocabulary projection only at the masked fraction of positions."""
    h, f, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    per_layer = 2 * (4 * h * h + 2 * h * f) + 2 * 2 * seq_len * h  # projections + attention scores/values
    head = mask_fraction * 2 * (h * h + h * cfg.vocab_size)
    return 3 * (layers * per_layer + head)
