"""The model: the same logits as Hugging Face's BertForMaskedLM under the same weights, a head
that projects only where asked, tied embeddings, and a file that imports torch alone."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pretrain.model import (
    IGNORE_INDEX,
    ROW_BUCKET,
    BertForMaskedLM,
    Dropout,
    ModelConfig,
    _numpy,
    cpu_dropout,
    flops_per_token,
    masked_positions,
    num_parameters,
)
from tests.conftest import REPO, heavy_imports

TINY = ModelConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, max_position=32)


def hf_twin(model: BertForMaskedLM):
    """A transformers BertForMaskedLM of the same shape holding our weights (a strict load)."""
    from transformers import BertConfig
    from transformers import BertForMaskedLM as HFBert

    c = model.config
    hf = HFBert(
        BertConfig(
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            num_hidden_layers=c.num_layers,
            num_attention_heads=c.num_heads,
            intermediate_size=c.intermediate_size,
            max_position_embeddings=c.max_position,
            type_vocab_size=c.type_vocab_size,
            layer_norm_eps=c.layer_norm_eps,
            hidden_act="gelu",
        )
    )
    state = dict(model.state_dict())
    state["cls.predictions.decoder.bias"] = state["cls.predictions.bias"]
    hf.load_state_dict(state, strict=True)
    return hf.eval()


def test_same_logits_as_transformers_with_padding() -> None:
    torch.manual_seed(0)
    model = BertForMaskedLM(TINY).eval()
    hf = hf_twin(model)
    ids = torch.randint(5, 300, (3, 20))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0  # a padded tail
    types = torch.zeros_like(ids)
    types[:, 10:] = 1
    with torch.no_grad():
        ours = model(ids, mask, types)
        theirs = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    real = mask.bool()
    assert torch.allclose(ours[real], theirs[real], atol=1e-5)


def test_head_projects_only_where_asked_and_loss_matches() -> None:
    torch.manual_seed(1)
    model = BertForMaskedLM(TINY).eval()
    ids = torch.randint(5, 300, (2, 16))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 3], labels[1, 7], labels[1, 9] = 11, 22, 33
    with torch.no_grad():
        full = model(ids)
        flat = (labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
        picked = model(ids, positions=flat)
        loss, correct, count = model.forward_loss(ids, labels)
    assert picked.shape == (3, 300)
    assert torch.allclose(picked, full.reshape(-1, 300)[flat], atol=1e-6)
    expected = F.cross_entropy(full.reshape(-1, 300), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    assert torch.allclose(loss, expected, atol=1e-6) and int(count) == 3
    assert int(correct) == int((picked.argmax(-1) == labels.reshape(-1)[flat]).sum())


def test_embeddings_are_tied_and_counted_once() -> None:
    model = BertForMaskedLM(TINY)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert num_parameters(model) == sum(p.numel() for p in model.parameters())  # parameters() dedups too
    assert num_parameters(model) < sum(p.numel() for p in model.state_dict().values())


@pytest.mark.parametrize("pre_ln", [False, True])
def test_trains_a_step_in_both_layer_norm_placements(pre_ln: bool) -> None:
    torch.manual_seed(2)
    model = BertForMaskedLM(ModelConfig(**{**TINY.__dict__, "pre_ln": pre_ln}))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(5, 300, (4, 16))
    labels = torch.where(torch.rand(ids.shape) < 0.3, ids, IGNORE_INDEX)
    losses = []
    for _ in range(5):
        loss, _, _ = model.forward_loss(ids, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert (model.bert.encoder.final_layer_norm is not None) == pre_ln


def test_bad_shape_names_the_keys() -> None:
    with pytest.raises(ValueError, match="model.hidden_size 100 does not divide by model.num_heads 3"):
        ModelConfig(hidden_size=100, num_heads=3)


def test_flops_count_masked_positions_only() -> None:
    mini = ModelConfig(vocab_size=32768, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024)
    assert abs(flops_per_token(mini, seq_len=128, mask_fraction=0.15) / 27.9e6 - 1) < 0.01  # the figure
    assert flops_per_token(mini, 128, 1.0) > 2 * flops_per_token(mini, 128, 0.15)


_WITHOUT_NUMPY = """
import json, math, sys, warnings
sys.modules["numpy"] = None  # 'import numpy' now fails, as where it is not installed
warnings.simplefilter("ignore")  # (torch's warning that numpy is missing)
import torch
from pretrain.model import BertForMaskedLM, ModelConfig, _numpy, cpu_dropout
x = torch.ones(1001, 999)
torch.manual_seed(0)
y = cpu_dropout(x, 0.1)
torch.manual_seed(0)
replays = torch.equal(cpu_dropout(x, 0.1), y)
edges = [int(cpu_dropout(x, 1 / 65536).eq(0).sum()), int(cpu_dropout(x, 1 - 1e-6).ne(0).sum())]
cfg = ModelConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, max_position=32)
model = BertForMaskedLM(cfg).train()
ids = torch.randint(5, 300, (2, 16))
labels = torch.full_like(ids, -100)
labels[:, 3] = ids[:, 3]
loss, _, _ = model(ids, labels=labels)
loss.backward()
print(json.dumps({"numpy": _numpy() is not None, "dropped": (y == 0).float().mean().item(), "replays": replays,
                  "edges": edges,
                  "loss": loss.item(), "grad": model.bert.embeddings.word_embeddings.weight.grad.abs().sum().item(),
                  "kept_value": y.max().item()}))
"""


def test_model_file_imports_torch_alone() -> None:
    assert heavy_imports("pretrain.model", {"deepspeed", "webdataset", "transformers", "sentencepiece"}) == []
    # numpy only speeds dropout up: without it the model trains, dropout drawn by torch
    out = subprocess.run([sys.executable, "-c", _WITHOUT_NUMPY], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout)
    assert got["numpy"] is False and got["replays"] and abs(got["dropped"] - 0.1) < 0.002
    assert 0 < got["edges"][0] < 100 and got["edges"][1] < 100  # the quantum (~15 of 1M), and nearly all
    assert got["kept_value"] == pytest.approx(1 / 0.9) and math.isfinite(got["loss"]) and got["grad"] > 0
    assert _numpy() is not None  # here, with numpy installed, its faster generator


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_head_loss_and_gradients_match_plain_cross_entropy(dtype) -> None:
    from pretrain.model import Decoder

    torch.manual_seed(0)
    rows, hidden, vocab = 37, 16, 50  # 37 rows in chunks of 8: a ragged last chunk
    h = torch.randn(rows, hidden, dtype=dtype, requires_grad=True)
    dec = Decoder(hidden, vocab, bias=False).to(dtype)
    dec.chunk = 8
    bias = torch.randn(vocab, dtype=dtype, requires_grad=True)
    target = torch.randint(0, vocab, (rows,))
    loss, correct = dec(h, bias, target)
    (loss * 3).backward()  # a scaled loss (as fp16 loss scaling does) scales every gradient
    got = [h.grad.clone(), dec.weight.grad.clone(), bias.grad.clone()]
    for t in (h, dec.weight, bias):
        t.grad = None
    logits = F.linear(h, dec.weight, bias).float()
    want_loss = F.cross_entropy(logits, target)
    (want_loss * 3).backward()
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-3}
    torch.testing.assert_close(loss, want_loss.detach(), **tol)
    assert correct.item() == (logits.argmax(-1) == target).sum().item()
    for g, t in zip(got, (h, dec.weight, bias)):
        assert g.dtype == dtype
        torch.testing.assert_close(g, t.grad, **tol)

    # Padded to a row bucket (as masked_positions pads): the extra rows change nothing
    for t in (dec.weight, bias):
        t.grad = None
    junk = torch.randn(11, hidden, dtype=dtype)
    padded = torch.cat([h.detach(), junk]).requires_grad_()
    loss_p, correct_p = dec(padded, bias, torch.cat([target, torch.zeros(11, dtype=target.dtype)]), rows=rows)
    (loss_p * 3).backward()
    assert torch.equal(loss_p, loss) and torch.equal(correct_p, correct)
    assert torch.equal(padded.grad[:rows], got[0]) and not padded.grad[rows:].any()
    torch.testing.assert_close(dec.weight.grad, got[1], **tol)  # (the same sums, in another blocking)
    assert torch.equal(bias.grad, got[2])


def test_fused_head_loss_stays_finite_where_the_target_probability_underflows() -> None:
    """Logit gaps of hundreds: the target's softmax probability is 0 in fp32, the loss is not."""
    from pretrain.model import Decoder

    dec = Decoder(2, 4, bias=False)
    with torch.no_grad():
        dec.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]))
    h = torch.tensor([[300.0, 0.0], [0.0, 150.0], [1.0, 2.0]], requires_grad=True)
    target = torch.tensor([2, 3, 0])  # two confidently wrong rows: gaps of 600 and 300
    loss, correct = dec(h, torch.zeros(4), target)
    want = F.cross_entropy(F.linear(h, dec.weight), target)
    assert torch.isfinite(loss) and correct.item() == 0
    torch.testing.assert_close(loss, want.detach(), rtol=1e-6, atol=1e-4)
    loss.backward()
    assert torch.isfinite(h.grad).all()


def test_masked_positions_pad_to_the_bucket() -> None:
    labels = torch.full((2, 40), IGNORE_INDEX)
    labels[0, 5], labels[1, 39] = 7, 8
    positions, rows = masked_positions(labels)
    assert rows == 2 and positions.tolist() == [5, 79] + [0] * (ROW_BUCKET - 2)
    labels[:] = 1
    positions, rows = masked_positions(labels)
    assert rows == 80 and len(positions) == 96 and positions[:80].tolist() == list(range(80))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_dropout_drops_the_asked_share_and_replays_with_the_seed(dtype) -> None:
    x = torch.ones(1001, 999, dtype=dtype, requires_grad=True)  # not a multiple of 4 (four masks a draw)
    torch.manual_seed(0)
    y = cpu_dropout(x, 0.1)
    kept = y.detach() != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.002
    assert cpu_dropout(x, 1 / 65536).detach().eq(0).sum() < 100  # the quantum: about 15 of 1M dropped
    assert cpu_dropout(x, 1 - 1e-6).detach().ne(0).sum() < 100  # nearly all dropped, not wrapped to none
    assert torch.equal(y.detach()[kept], torch.full((int(kept.sum()),), 1 / 0.9, dtype=dtype))
    y.backward(torch.full_like(y, 2.0))
    assert torch.equal(x.grad, 2.0 * y.detach())  # the gradient passes where kept, scaled alike
    flat = kept.flatten().float()
    for a, b in ((flat[:-1], flat[1:]), (flat[: flat.numel() // 2], flat[flat.numel() // 2 : 2 * (flat.numel() // 2)])):
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.01  # neighbours, and the two halves
    torch.manual_seed(0)
    assert torch.equal(cpu_dropout(x, 0.1), y)  # the same generator state, the same mask
    assert not torch.equal(cpu_dropout(x, 0.1), y)
    layer = Dropout(0.1).eval()
    assert layer(x) is x
