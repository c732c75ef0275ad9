import math

import numpy as np
import pytest
import torch

from filterkit.augment import TwoViews
from filterkit.encoder import build_backbone
from filterkit.moco import MoCo, contrastive_loss, mlp, momentum_at
from filterkit.modeldir import ModelConfig
from filterkit.train import lr_at


def reference_ctr(q: np.ndarray, k: np.ndarray, tau: float) -> float:
    """ctr(q, k) written out: mean_i −log(exp(q_i·k_i/τ) / Σ_j exp(q_i·k_j/τ)) · 2τ."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    k = k / np.linalg.norm(k, axis=1, keepdims=True)
    total = 0.0
    for i in range(len(q)):
        logits = [float(q[i] @ k[j]) / tau for j in range(len(k))]
        total += -logits[i] + math.log(sum(math.exp(x) for x in logits))
    return total / len(q) * 2 * tau


def test_loss_equals_the_formula_on_fixed_tensors():
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(6, 8)), rng.normal(size=(6, 8))
    got = contrastive_loss(torch.tensor(q, dtype=torch.float32), torch.tensor(k, dtype=torch.float32), 0.2)
    assert float(got) == pytest.approx(reference_ctr(q, k, 0.2), rel=1e-5)
    # Not symmetric in (q, k): swapping changes which side normalises the softmax.
    swapped = contrastive_loss(torch.tensor(k, dtype=torch.float32), torch.tensor(q, dtype=torch.float32), 0.2)
    assert float(swapped) == pytest.approx(reference_ctr(k, q, 0.2), rel=1e-5)


def reference_ctr_with_queue(q: np.ndarray, k: np.ndarray, queue: np.ndarray, tau: float) -> float:
    """MoCo v2's ctr(q, k) written out: the logits of q_i are q_i·k_j/τ over the batch's keys,
    then q_i·n/τ over the queued keys n (already unit vectors); the positive is k_i."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    k = k / np.linalg.norm(k, axis=1, keepdims=True)
    total = 0.0
    for i in range(len(q)):
        logits = [float(q[i] @ k[j]) / tau for j in range(len(k))] + [float(q[i] @ n) / tau for n in queue]
        total += -logits[i] + math.log(sum(math.exp(x) for x in logits))
    return total / len(q) * 2 * tau


def test_loss_with_a_queue_equals_the_formula_on_fixed_tensors():
    rng = np.random.default_rng(1)
    q, k = rng.normal(size=(4, 8)), rng.normal(size=(4, 8))
    queue = rng.normal(size=(7, 8))
    queue /= np.linalg.norm(queue, axis=1, keepdims=True)
    as_t = lambda a: torch.tensor(a, dtype=torch.float32)
    for tau in (0.2, 0.5):
        got = contrastive_loss(as_t(q), as_t(k), tau, as_t(queue))
        assert float(got) == pytest.approx(reference_ctr_with_queue(q, k, queue, tau), rel=1e-5)
        # more negatives: the loss grows (the queue's columns only add to the denominator)
        assert float(got) > float(contrastive_loss(as_t(q), as_t(k), tau))
    # No queue and an empty one are the MoCo v3 loss, bit for bit.
    plain = contrastive_loss(as_t(q), as_t(k), 0.2)
    assert torch.equal(contrastive_loss(as_t(q), as_t(k), 0.2, torch.empty(0, 8)), plain)
    assert torch.equal(contrastive_loss(as_t(q), as_t(k), 0.2, None), plain)
    # The queue gets no gradient, the query does.
    qt, rows = as_t(q).requires_grad_(True), as_t(queue).requires_grad_(True)
    contrastive_loss(qt, as_t(k), 0.2, rows).backward()
    assert qt.grad is not None and rows.grad is None


def test_model_contrasts_with_the_queue_then_pushes_both_views_keys_fifo():
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("vit-mini-8-32", depth=1)
    model = MoCo(build_backbone(cfg), cfg.embed_dim, out_dim=16, proj_hidden=32, pred_hidden=32, queue_size=10)
    assert set(model.queue.state_dict()) == {"rows", "ptr", "filled"}

    def step(x1, x2):
        loss, _ = model(x1, x2)
        with torch.no_grad():
            z1, z2, _ = model.base(x1, x2)
            q1, q2 = model.predictor(z1), model.predictor(z2)
            k1, k2, _ = model.momentum(x1, x2)
        loss.backward()  # the push after the loss must not break its backward
        unit = lambda t: torch.nn.functional.normalize(t, dim=1)
        return float(loss.detach()), (q1, q2), torch.cat([unit(k1), unit(k2)])

    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    loss, (q1, q2), keys = step(x1, x2)  # the first step: an empty queue, the MoCo v3 loss
    with torch.no_grad():
        k1, k2 = keys[:4], keys[4:]
        assert loss == pytest.approx(float(contrastive_loss(q1, k2, 0.2) + contrastive_loss(q2, k1, 0.2)), rel=1e-5)
    assert (int(model.queue.filled), int(model.queue.ptr)) == (8, 8)
    torch.testing.assert_close(model.queue.rows[:8], keys, rtol=0, atol=1e-6)  # k̄1 then k̄2
    first = keys

    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    loss, (q1, q2), keys = step(x1, x2)  # the 8 keys of step 1 are the queue (pushed after the loss)
    queue = first.numpy()
    want = (reference_ctr_with_queue(q1.numpy(), keys[4:].numpy(), queue, 0.2)
            + reference_ctr_with_queue(q2.numpy(), keys[:4].numpy(), queue, 0.2))
    assert loss == pytest.approx(want, rel=1e-5)
    # FIFO over 10 rows: the 8 new keys fill rows 8, 9, then wrap over the oldest, rows 0-5.
    assert (int(model.queue.filled), int(model.queue.ptr)) == (10, 6)
    torch.testing.assert_close(model.queue.rows[8:10], keys[:2], rtol=0, atol=1e-6)
    torch.testing.assert_close(model.queue.rows[0:6], keys[2:], rtol=0, atol=1e-6)
    torch.testing.assert_close(model.queue.rows[6:8], first[6:8], rtol=0, atol=0)  # not yet overwritten
    assert model.queue.rows.grad is None and not model.queue.rows.requires_grad


def test_no_queue_leaves_the_moco_v3_state_unchanged():
    cfg = ModelConfig.from_preset("vit-mini-8-32", depth=1)
    plain = MoCo(build_backbone(cfg), cfg.embed_dim, out_dim=16, proj_hidden=32, pred_hidden=32)
    zero = MoCo(build_backbone(cfg), cfg.embed_dim, out_dim=16, proj_hidden=32, pred_hidden=32, queue_size=0)
    assert plain.queue is None and zero.queue is None and set(plain.state_dict()) == set(zero.state_dict())
    assert not any(key.startswith("queue") for key in plain.state_dict())


def test_loss_at_init_on_random_unit_vectors_is_about_2_tau_log_n():
    torch.manual_seed(0)
    n, tau = 128, 0.2
    q, k = torch.randn(n, 512), torch.randn(n, 512)
    assert float(contrastive_loss(q, k, tau)) == pytest.approx(2 * tau * math.log(n), rel=0.05)


def test_model_loss_is_symmetric_sum_of_the_two_ctr_terms():
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("vit-mini-8-32", depth=1)
    model = MoCo(build_backbone(cfg), cfg.embed_dim, out_dim=16, proj_hidden=32, pred_hidden=32)
    x1, x2 = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    loss, features = model(x1, x2)
    with torch.no_grad():
        z1, z2, _ = model.base(x1, x2)
        q1, q2 = model.predictor(z1), model.predictor(z2)
        k1, k2, _ = model.momentum(x1, x2)
    expected = contrastive_loss(q1, k2, 0.2) + contrastive_loss(q2, k1, 0.2)
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    assert features.shape == (16, cfg.embed_dim) and not features.requires_grad


def test_momentum_update_moves_the_momentum_encoder_by_exactly_one_minus_m_and_skips_the_predictor():
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("vit-mini-8-32", depth=1)
    model = MoCo(build_backbone(cfg), cfg.embed_dim, out_dim=16, proj_hidden=32, pred_hidden=32)
    with torch.no_grad():
        for p in model.base.parameters():
            p.add_(torch.randn_like(p))  # base and momentum now differ
    before_momentum = [p.clone() for p in model.momentum.parameters()]
    base = [p.clone() for p in model.base.parameters()]
    predictor = [p.clone() for p in model.predictor.parameters()]
    model.momentum_update(0.9)
    for old, b, new in zip(before_momentum, base, model.momentum.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * b, rtol=0, atol=1e-6)
    for old, new in zip(predictor, model.predictor.parameters()):
        assert torch.equal(old, new)
    assert not any(p.requires_grad for p in model.momentum.parameters())
    predictor_ids = {id(p) for p in model.predictor.parameters()}
    assert not predictor_ids & {id(p) for p in model.momentum.parameters()}


def test_heads_follow_the_paper_layout():
    head = mlp(3, 192, 64, 16)
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert all(m.bias is None for m in head if isinstance(m, torch.nn.Linear))
    assert not head[-1].affine and head[1].affine


def test_no_predictor_means_identity():
    cfg = ModelConfig.from_preset("vit-mini-8-32", depth=1)
    model = MoCo(build_backbone(cfg), cfg.embed_dim, out_dim=16, proj_hidden=32, pred_hidden=32, predictor=False)
    assert isinstance(model.predictor, torch.nn.Identity)
    assert not list(model.predictor.parameters())


def test_schedules_hit_their_endpoints():
    assert momentum_at(0, 100, 0.99) == pytest.approx(0.99)
    assert momentum_at(100, 100, 0.99) == pytest.approx(1.0)
    assert momentum_at(50, 100, 0.99) == pytest.approx(0.995)
    values = [momentum_at(t, 100) for t in range(101)]
    assert values == sorted(values)
    assert lr_at(0, 100, 10, 1e-3) == 0.0
    assert lr_at(10, 100, 10, 1e-3) == pytest.approx(1e-3)
    assert lr_at(55, 100, 10, 1e-3) == pytest.approx(5e-4)
    assert lr_at(100, 100, 10, 1e-3) == pytest.approx(0.0, abs=1e-12)
    warm = [lr_at(t, 100, 10, 1e-3) for t in range(11)]
    assert warm == sorted(warm)


def test_two_views_differ_and_small_images_get_no_blur():
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8))
    small, large = TwoViews(32), TwoViews(224)
    x1, x2 = small(image)
    assert x1.shape == x2.shape == (3, 32, 32) and not torch.equal(x1, x2)
    names = lambda c: repr(c)  # noqa: E731
    assert "GaussianBlur" not in names(small.view1) and "GaussianBlur" not in names(small.view2)
    assert "GaussianBlur" in names(large.view1) and "GaussianBlur" in names(large.view2)
    assert "RandomSolarize" in names(large.view2) and "RandomSolarize" not in names(large.view1)
