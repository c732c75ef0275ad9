"""The methods behind `pretrain --method`: each loss against its paper's formula written out
(naive loops, independent of the code under test), a few CPU steps, exact resume, and the
cross-rank gathering of SimCLR, Barlow Twins, SupCon, the NNCLR queue and the Mean Shift bank under
gloo DDP."""

import json
import math

import numpy as np
import pytest
import torch

from conftest import sample_photo
from filterkit import FilterkitError
from filterkit.cli import main
from filterkit.encoder import build_backbone
from filterkit.methods import METHODS, build_method, method_class
from filterkit.methods.barlow_twins import LAMBDA, BarlowTwins, barlow_loss
from filterkit.methods.base import EmbeddingQueue
from filterkit.methods.byol import BYOL, regression_loss
from filterkit.methods.meanshift import MeanShift
from filterkit.methods.nnclr import NNCLR
from filterkit.methods.simclr import SimCLR, nt_xent
from filterkit.methods.simsiam import SimSiam, simsiam_loss
from filterkit.methods.supcon import SupCon, supcon_loss
from filterkit.methods.swav import SwAV, sinkhorn, swapped_prediction
from filterkit.modeldir import CONFIG_FILE, ModelConfig
from filterkit.train import (
    CHECKPOINT,
    TrainOptions,
    folder_labels,
    load_checkpoint,
    pretrain,
)
from test_train import TINY, _free_port, params


def reference_nt_xent(z1: np.ndarray, z2: np.ndarray, tau: float) -> float:
    """SimCLR's eq. (1) in the paper's indexing: samples 2k and 2k+1 are the views of image k,
    ℓ(i, j) = −log(exp(s_ij/τ) / Σ_{k≠i} exp(s_ik/τ)), L = 1/2N Σ_k ℓ(2k, 2k+1) + ℓ(2k+1, 2k)."""
    z = [v / np.linalg.norm(v) for pair in zip(z1, z2) for v in pair]

    def ell(i, j):
        others = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(len(z)) if k != i)
        return -math.log(math.exp(float(z[i] @ z[j]) / tau) / others)

    n = len(z1)
    return sum(ell(2 * k, 2 * k + 1) + ell(2 * k + 1, 2 * k) for k in range(n)) / (2 * n)


def reference_byol(p1, p2, t1, t2) -> float:
    """BYOL's loss as the paper first writes it: ‖p̄ − z̄'‖² per image, averaged, symmetrised."""
    def ell(p, z):
        return np.mean([np.sum((a / np.linalg.norm(a) - b / np.linalg.norm(b)) ** 2) for a, b in zip(p, z)])

    return float(ell(p1, t2) + ell(p2, t1))


def _unit(v):
    return v / np.linalg.norm(v)


def reference_simsiam(p1, p2, z1, z2) -> float:
    """Chen & He 2021, eq. (1)-(2): D(p, z) = −p/‖p‖ · z/‖z‖, L = D(p1, z2)/2 + D(p2, z1)/2, per image."""
    return float(np.mean([-(_unit(a) @ _unit(b)) / 2 - (_unit(c) @ _unit(d)) / 2
                          for a, b, c, d in zip(p1, z2, p2, z1)]))


def reference_barlow(za, zb, lam) -> float:
    """Zbontar et al. 2021, eq. (2): C_ij from batch-centred z, Σ_b a_bi b_bj / (√Σ_b a_bi² √Σ_b b_bj²)."""
    za, zb = za - za.mean(0), zb - zb.mean(0)
    d = za.shape[1]
    total = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(za[b, i] * zb[b, j] for b in range(len(za))) / (
                math.sqrt(sum(za[b, i] ** 2 for b in range(len(za)))) * math.sqrt(sum(zb[b, j] ** 2 for b in range(len(zb)))))
            total += (1 - c) ** 2 if i == j else lam * c ** 2
    return total


def reference_supcon(z1, z2, labels, tau) -> float:
    """Khosla et al. 2020, eq. (2) (L^sup_out), averaged over the 2N anchors."""
    z = [_unit(v) for v in list(z1) + list(z2)]
    y = list(labels) + list(labels)
    total = 0.0
    for i in range(len(z)):
        others = [a for a in range(len(z)) if a != i]
        denominator = sum(math.exp(z[i] @ z[a] / tau) for a in others)
        positives = [p for p in others if y[p] == y[i]]
        total += -sum(math.log(math.exp(z[i] @ z[p] / tau) / denominator) for p in positives) / len(positives)
    return total / len(z)


def reference_nnclr(z1, z2, p1, p2, support, tau) -> float:
    """Dwibedi et al. 2021, section 3, symmetrised: the neighbour of z̄ in the support set against
    the other view's predictions of the batch."""
    def one_side(z, p):
        p = [_unit(v) for v in p]
        total = 0.0
        for i, zi in enumerate(z):
            nn = max(support, key=lambda q: float(_unit(zi) @ q))
            total += -math.log(math.exp(nn @ p[i] / tau) / sum(math.exp(nn @ pk / tau) for pk in p))
        return total / len(z)

    return (one_side(z1, p2) + one_side(z2, p1)) / 2


def reference_meanshift(p1, p2, t1, t2, bank, k) -> float:
    """Koohpayegani et al. 2021, section 3, symmetrised: mean over the k bank rows most similar
    to t̄ of ‖p̄ − n‖²."""
    def one_side(p, t):
        total = 0.0
        for pi, ti in zip(p, t):
            near = sorted(bank, key=lambda n: -float(_unit(ti) @ n))[:k]
            total += sum(float(np.sum((_unit(pi) - n) ** 2)) for n in near) / k
        return total / len(p)

    return (one_side(p1, t2) + one_side(p2, t1)) / 2


def reference_sinkhorn(scores, eps, iterations):
    """Caron et al. 2020, section 3.1: Q = exp(S/ε) [K, B] scaled to total 1, then alternately
    each prototype's row to 1/K and each image's column to 1/B; codes = B·Q, one row per image."""
    b, k = scores.shape
    q = [[math.exp(scores[i][j] / eps) for i in range(b)] for j in range(k)]
    total = sum(map(sum, q))
    q = [[v / total for v in row] for row in q]
    for _ in range(iterations):
        q = [[v / sum(row) / k for v in row] for row in q]
        columns = [sum(q[j][i] for j in range(k)) for i in range(b)]
        q = [[q[j][i] / columns[i] / b for i in range(b)] for j in range(k)]
    return np.array([[b * q[j][i] for j in range(k)] for i in range(b)])


def reference_swav(s1, s2, q1, q2, tau):
    """Caron et al. 2020, section 3.1: ℓ(z_t, q_s) = −Σ_k q_s^k log softmax(z_tᵀc/τ)^k, swapped, averaged."""
    def ell(s, q):
        return np.mean([-sum(qk * (sk / tau - math.log(sum(math.exp(v / tau) for v in si)))
                             for qk, sk in zip(qi, si)) for si, qi in zip(s, q)])

    return (ell(s1, q2) + ell(s2, q1)) / 2


def tiny_backbone():
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("vit-mini-8-32", depth=1)
    return build_backbone(cfg), cfg.embed_dim


def test_nt_xent_equals_the_formula_on_fixed_tensors():
    rng = np.random.default_rng(0)
    z1, z2 = rng.normal(size=(5, 8)), rng.normal(size=(5, 8))
    for tau in (0.1, 0.2):
        got = nt_xent(torch.tensor(z1, dtype=torch.float32), torch.tensor(z2, dtype=torch.float32), tau)
        assert float(got) == pytest.approx(reference_nt_xent(z1, z2, tau), rel=1e-5)


def test_byol_loss_equals_the_formula_on_fixed_tensors():
    rng = np.random.default_rng(1)
    p1, p2, t1, t2 = (rng.normal(size=(6, 8)) for _ in range(4))
    as_t = lambda a: torch.tensor(a, dtype=torch.float32)
    got = regression_loss(as_t(p1), as_t(t2)) + regression_loss(as_t(p2), as_t(t1))
    assert float(got) == pytest.approx(reference_byol(p1, p2, t1, t2), rel=1e-5)


def test_byol_model_loss_is_the_symmetrised_regression_onto_the_target():
    backbone, dim = tiny_backbone()
    model = BYOL(backbone, dim, out_dim=16, proj_hidden=32, pred_hidden=32)
    x1, x2 = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    loss, features = model(x1, x2)
    with torch.no_grad():
        z1, z2, _ = model.base(x1, x2)
        p1, p2 = model.predictor(z1), model.predictor(z2)
        t1, t2, _ = model.target(x1, x2)
    assert float(loss.detach()) == pytest.approx(reference_byol(*(t.numpy() for t in (p1, p2, t1, t2))), rel=1e-5)
    assert features.shape == (16, dim) and not features.requires_grad
    loss.backward()  # sg(z'): the target gets no gradient
    assert all(p.grad is None for p in model.target.parameters())


def test_byol_ema_moves_the_target_by_one_minus_m_and_never_touches_the_predictor():
    backbone, dim = tiny_backbone()
    model = BYOL(backbone, dim, out_dim=16, proj_hidden=32, pred_hidden=32)
    with torch.no_grad():
        for p in model.base.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in model.target.parameters()]
    online = [p.clone() for p in model.base.parameters()]
    predictor = [p.clone() for p in model.predictor.parameters()]
    model.momentum_update(0.9)
    for old, b, new in zip(before, online, model.target.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * b, rtol=0, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(predictor, model.predictor.parameters()))
    assert BYOL.uses_momentum and BYOL.needs_predictor


def test_simsiam_loss_equals_the_formula_and_stops_the_gradient_at_z():
    rng = np.random.default_rng(2)
    p1, p2, z1, z2 = (rng.normal(size=(6, 8)) for _ in range(4))
    got = simsiam_loss(*(torch.tensor(a, dtype=torch.float32) for a in (p1, p2, z1, z2)))
    assert float(got) == pytest.approx(reference_simsiam(p1, p2, z1, z2), rel=1e-5)
    backbone, dim = tiny_backbone()
    model = SimSiam(backbone, dim, out_dim=16, proj_hidden=32)
    assert model.predictor[0].out_features == 4  # the bottleneck: out_dim / 4
    p, z = torch.randn(4, 16, requires_grad=True), torch.randn(4, 16, requires_grad=True)
    grad_p, grad_z = torch.autograd.grad(simsiam_loss(p, p, z, z), [p, z], allow_unused=True)
    assert grad_p is not None and grad_z is None  # sg(z): no gradient through the target side
    assert not SimSiam.uses_momentum and SimSiam.needs_predictor


def test_barlow_twins_loss_equals_the_formula_on_fixed_tensors():
    rng = np.random.default_rng(3)
    za, zb = rng.normal(size=(7, 5)), rng.normal(size=(7, 5))
    got = barlow_loss(torch.tensor(za, dtype=torch.float32), torch.tensor(zb, dtype=torch.float32))
    assert LAMBDA == 5e-3
    assert float(got) == pytest.approx(reference_barlow(za, zb, LAMBDA), rel=1e-4)
    assert not (BarlowTwins.uses_momentum or BarlowTwins.needs_predictor)


def test_supcon_loss_equals_the_formula_on_fixed_tensors():
    rng = np.random.default_rng(4)
    z1, z2 = rng.normal(size=(6, 8)), rng.normal(size=(6, 8))
    labels = np.array([0, 1, 0, 2, 1, 0])
    for tau in (0.1, 0.5):
        got = supcon_loss(torch.tensor(z1, dtype=torch.float32), torch.tensor(z2, dtype=torch.float32),
                          torch.tensor(labels), tau)
        assert float(got) == pytest.approx(reference_supcon(z1, z2, labels, tau), rel=1e-5)
    # every image its own class: SupCon is SimCLR's NT-Xent
    distinct = torch.arange(6)
    as_t = lambda a: torch.tensor(a, dtype=torch.float32)
    assert float(supcon_loss(as_t(z1), as_t(z2), distinct, 0.2)) == pytest.approx(float(nt_xent(as_t(z1), as_t(z2), 0.2)),
                                                                               rel=1e-5)
    with pytest.raises(FilterkitError, match="supervised"):
        SupCon(*tiny_backbone(), out_dim=16, proj_hidden=32)(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))


def test_swav_codes_and_loss_equal_the_formulas_on_fixed_tensors():
    rng = np.random.default_rng(5)
    z = rng.normal(size=(6, 4))
    c = rng.normal(size=(5, 4))
    scores = (z / np.linalg.norm(z, axis=1, keepdims=True)) @ (c / np.linalg.norm(c, axis=1, keepdims=True)).T
    q = sinkhorn(torch.tensor(scores, dtype=torch.float32), epsilon=0.05, iterations=3)
    torch.testing.assert_close(q, torch.tensor(reference_sinkhorn(scores, 0.05, 3), dtype=torch.float32),
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(q.sum(1), torch.ones(6))  # each image's code sums to 1
    s1, s2 = rng.uniform(-1, 1, size=(6, 5)), rng.uniform(-1, 1, size=(6, 5))
    q1, q2 = reference_sinkhorn(s1, 0.05, 3), reference_sinkhorn(s2, 0.05, 3)
    as_t = lambda a: torch.tensor(a, dtype=torch.float32)
    got = swapped_prediction(as_t(s1), as_t(s2), as_t(q1), as_t(q2), 0.1)
    assert float(got) == pytest.approx(reference_swav(s1, s2, q1, q2, 0.1), rel=1e-5)
    backbone, dim = tiny_backbone()
    model = SwAV(backbone, dim, out_dim=16, proj_hidden=32, prototypes=10)
    model(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))[0].backward()
    torch.testing.assert_close(model.prototypes.weight.detach().norm(dim=1), torch.ones(10))  # renormalised
    assert model.prototypes.weight.grad is not None and not SwAV.uses_momentum


def test_embedding_queue_is_a_fifo_ring_kept_in_the_state_dict():
    queue = EmbeddingQueue(5, 2)
    assert queue.contents().shape == (0, 2)
    queue.push(torch.tensor([[1.0, 0], [2, 0], [3, 0]]))
    assert queue.contents()[:, 0].tolist() == [1, 2, 3]
    queue.push(torch.tensor([[4.0, 0], [5, 0], [6, 0]]))  # wraps: 6 replaces the oldest, 1
    assert sorted(queue.contents()[:, 0].tolist()) == [2, 3, 4, 5, 6]
    copy = EmbeddingQueue(5, 2)
    copy.load_state_dict(queue.state_dict())
    copy.push(torch.tensor([[7.0, 0]]))
    assert sorted(copy.contents()[:, 0].tolist()) == [3, 4, 5, 6, 7]
    assert set(queue.state_dict()) == {"rows", "ptr", "filled"}


def test_nnclr_loss_equals_the_formula_with_the_queue_as_support_set():
    backbone, dim = tiny_backbone()
    model = NNCLR(backbone, dim, out_dim=16, proj_hidden=32, pred_hidden=32, temperature=0.1, queue_size=12)
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    loss, _ = model(x1, x2)  # the first step: an empty queue, each embedding its own neighbour
    assert int(model.queue.filled) == 4
    support = torch.nn.functional.normalize(torch.randn(12, 16), dim=1)
    model.queue.push(support)
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    loss, _ = model(x1, x2)
    with torch.no_grad():
        z1, z2, _ = model.base(x1, x2)
        p1, p2 = model.predictor(z1), model.predictor(z2)
    want = reference_nnclr(*(t.numpy() for t in (z1, z2, p1, p2)), list(support.numpy()), 0.1)
    assert float(loss.detach()) == pytest.approx(want, rel=1e-4)
    # the batch's z̄1 went in after the lookup, over the oldest rows (4 + 12 pushed before: at 4)
    torch.testing.assert_close(model.queue.rows[4:8], torch.nn.functional.normalize(z1, dim=1), rtol=0, atol=1e-6)
    loss.backward()
    assert model.queue.rows.grad is None and not NNCLR.uses_momentum


def test_meanshift_loss_equals_the_formula_over_the_bank_including_the_batch():
    backbone, dim = tiny_backbone()
    model = MeanShift(backbone, dim, out_dim=16, proj_hidden=32, pred_hidden=32, bank_size=20)
    old = torch.nn.functional.normalize(torch.randn(9, 16), dim=1)
    model.bank.push(old)
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    loss, _ = model(x1, x2)
    with torch.no_grad():
        z1, z2, _ = model.base(x1, x2)
        p1, p2 = model.predictor(z1), model.predictor(z2)
        t1, t2, _ = model.target(x1, x2)
    t1n, t2n = (torch.nn.functional.normalize(t, dim=1) for t in (t1, t2))
    bank = list(torch.cat([old, t1n, t2n]).numpy())  # the batch's targets are pushed first
    want = reference_meanshift(p1.numpy(), p2.numpy(), t1.numpy(), t2.numpy(), bank, 5)
    assert float(loss.detach()) == pytest.approx(want, rel=1e-4)
    assert int(model.bank.filled) == 17
    loss.backward()
    assert all(p.grad is None for p in model.target.parameters())
    assert MeanShift.uses_momentum and MeanShift.needs_predictor


def test_folder_labels_are_the_first_level_sub_folders(tmp_path):
    for rel in ("b/x.png", "a/deep/y.png", "a/z.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).touch()
    paths = sorted(tmp_path.rglob("*.png"))
    classes, labels = folder_labels(tmp_path, paths, "supcon")
    assert classes == ["a", "b"]
    assert {p.relative_to(tmp_path).as_posix(): y for p, y in zip(paths, labels)} == \
        {"a/deep/y.png": 0, "a/z.png": 0, "b/x.png": 1}
    (tmp_path / "loose.png").touch()
    with pytest.raises(FilterkitError, match=r"1 images lie directly in it \(e.g. loose.png\)"):
        folder_labels(tmp_path, sorted(tmp_path.rglob("*.png")), "supcon")
    with pytest.raises(FilterkitError, match="needs at least 2 classes"):
        folder_labels(tmp_path, [tmp_path / "a" / "z.png"], "supcon")


def test_simclr_has_no_momentum_encoder_or_predictor():
    backbone, dim = tiny_backbone()
    model = SimCLR(backbone, dim, out_dim=16, proj_hidden=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.momentum_update(0.5)  # a no-op
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not SimCLR.uses_momentum
    assert not any(k.startswith(("momentum", "target", "predictor")) for k in before)


def test_every_registered_method_builds_and_exports_its_online_backbone():
    opts = TrainOptions(**TINY).resolved("cpu")
    for name in METHODS:
        backbone, dim = tiny_backbone()
        method = build_method(name, backbone, dim, opts)
        assert method.name == name and method.backbone is backbone
        labels = {"labels": torch.tensor([0, 1, 0, 1])} if method.needs_labels else {}
        loss, features = method(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), **labels)
        assert loss.ndim == 0 and math.isfinite(float(loss.detach())) and features.shape == (8, dim)
    with pytest.raises(FilterkitError, match="unknown method 'dino'; choose one of moco-v3, simclr, byol, simsiam"):
        method_class("dino")


@pytest.mark.parametrize("method", ["simclr", "byol", "simsiam", "barlow-twins", "nnclr", "meanshift", "supcon",
                                    "swav"])
def test_method_trains_with_finite_losses_and_resumes_exactly(tmp_path, train_dir, method):
    opts = TrainOptions(max_steps=4, epochs=10, method=method, **TINY)
    straight = pretrain(train_dir, tmp_path / "a", opts, device="cpu", workers=0, progress=False)
    log = [json.loads(line) for line in (tmp_path / "a" / "training" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in log)
    assert ("momentum" in log[0]) == method_class(method).uses_momentum  # only an EMA method logs one
    doc = json.loads((tmp_path / "a" / CONFIG_FILE).read_text())["training"]
    assert (doc["method"], doc["method_option"]) == (method_class(method).title, method)
    checkpoint = load_checkpoint(tmp_path / "a" / CHECKPOINT)
    assert checkpoint["options"]["method"] == method
    assert checkpoint.get("classes") == (["part0", "part1", "part2"] if method == "supcon" else None)

    pretrain(train_dir, tmp_path / "b", opts, device="cpu", workers=0, progress=False, stop_at_step=2)
    with pytest.raises(FilterkitError, match=f"differ from the checkpoint: method \\(checkpoint '{method}', "
                                             "now 'moco-v3'\\)"):
        pretrain(train_dir, tmp_path / "b", TrainOptions(method="moco-v3"), resume=True, device="cpu", workers=0,
                 progress=False)
    resumed = pretrain(train_dir, tmp_path / "b", TrainOptions(), resume=True, device="cpu", workers=0,
                       progress=False)
    a, b = params(straight.model.state_dict()), params(resumed.model.state_dict())
    assert resumed.steps == 4 and a.keys() == b.keys()
    for key in a:  # queues and banks included: they are buffers
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    for key, value in straight.model.state_dict().items():  # queue pointers and fill counts too
        if not value.is_floating_point():
            assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_init_from_another_methods_run_loads_the_backbone_only(tmp_path, train_dir):
    moco = pretrain(train_dir, tmp_path / "moco", TrainOptions(max_steps=1, epochs=10, **TINY), device="cpu",
                    workers=0, progress=False)
    byol = pretrain(train_dir, tmp_path / "byol", TrainOptions(max_steps=1, epochs=10, lr=0.0, method="byol",
                                                               init_from=str(tmp_path / "moco"), **TINY),
                    device="cpu", workers=0, progress=False)
    doc = json.loads((tmp_path / "byol" / CONFIG_FILE).read_text())["training"]
    assert doc["init"]["loaded"] == "backbone" and doc["method"] == "BYOL"
    key = "blocks.0.attn.qkv.weight"
    start = moco.model.base.backbone.state_dict()[key]
    assert torch.equal(byol.model.backbone.state_dict()[key], start)  # lr 0: still the init's
    # ξ = m·ξ + (1 − m)·θ with ξ = θ: the init's, up to rounding
    torch.testing.assert_close(byol.model.target.backbone.state_dict()[key], start, rtol=0, atol=1e-6)
    # Without --method a run continues the init checkpoint's method, heads and all.
    again = pretrain(train_dir, tmp_path / "again", TrainOptions(max_steps=1, init_from=str(tmp_path / "byol"),
                                                                 batch_size=8), device="cpu", workers=0,
                     progress=False)
    assert isinstance(again.model, BYOL)
    assert json.loads((tmp_path / "again" / CONFIG_FILE).read_text())["training"]["init"]["loaded"] == \
        "encoders and heads"


def test_cli_method_errors_are_one_line(tmp_path, train_dir, capsys):
    common = ["pretrain", str(train_dir), "--out", str(tmp_path / "m"), "--batch-size", "8", "--max-steps", "1",
              "--workers", "0", "-q"]
    assert main([*common, "--method", "dino"]) == 1
    assert capsys.readouterr().err.strip() == ("error: unknown method 'dino'; choose one of moco-v3, simclr, byol, simsiam, "
                                                 "barlow-twins, nnclr, meanshift, supcon, swav")
    assert main([*common, "--method", "byol", "--no-predictor"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --method byol trains through its predictor: leave out --no-predictor"]
    assert not (tmp_path / "m").exists()


def test_ddp_simclr_gathers_embeddings_with_their_gradients(tmp_path, train_dir):
    import torch.multiprocessing as mp

    import _ddp_worker

    mp.start_processes(_ddp_worker.run_simclr, args=(2, _free_port(), str(train_dir), str(tmp_path / "m"),
                                                     str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"simclr{r}.pt", weights_only=True) for r in (0, 1))
    # One process over the whole global batch: the same loss, and DDP's average of the ranks'
    # gradients (each rank's / 2) is its gradient.
    z1, z2 = r0["z1_all"].clone().requires_grad_(True), r0["z2_all"].clone().requires_grad_(True)
    single = nt_xent(z1, z2, 0.2)
    single.backward()
    torch.testing.assert_close(r0["mean_loss"], single.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([r0["grad1"], r1["grad1"]]) / 2, z1.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.cat([r0["grad2"], r1["grad2"]]) / 2, z2.grad, rtol=1e-4, atol=1e-6)
    # A real run: both ranks step the same weights.
    weights = [k for k in params(r0["state"]) if "running_" not in k]
    for key in weights:
        torch.testing.assert_close(r0["state"][key], r1["state"][key], rtol=0, atol=0, msg=key)
    assert math.isfinite(r0["loss"]) and (tmp_path / "m" / CONFIG_FILE).is_file()


def test_ddp_barlow_twins_supcon_and_swav_compute_over_the_global_batch(tmp_path, train_dir):
    import torch.multiprocessing as mp

    import _ddp_worker

    mp.start_processes(_ddp_worker.run_global_batch, args=(2, _free_port(), str(train_dir), str(tmp_path / "m"),
                                                           str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"global{r}.pt", weights_only=True) for r in (0, 1))
    # One process over the global batch: the same loss, and DDP's average of the ranks'
    # gradients (each rank's / 2) is its gradient. Barlow Twins' batch statistics and C must
    # cover both ranks' rows; SupCon's positives, both ranks' labels.
    for name, loss_of in (("barlow", barlow_loss), ("supcon", lambda a, b: supcon_loss(a, b, r0["labels_all"], 0.2))):
        z1, z2 = r0["z1_all"].clone().requires_grad_(True), r0["z2_all"].clone().requires_grad_(True)
        single = loss_of(z1, z2)
        single.backward()
        torch.testing.assert_close(r0[f"{name}_loss"], single.detach(), rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(torch.cat([r0[f"{name}_grad1"], r1[f"{name}_grad1"]]) / 2, z1.grad, rtol=1e-4,
                                   atol=1e-6, msg=name)
        torch.testing.assert_close(torch.cat([r0[f"{name}_grad2"], r1[f"{name}_grad2"]]) / 2, z2.grad, rtol=1e-4,
                                   atol=1e-6, msg=name)
    # SwAV's equal partition is over the global batch: the ranks' codes are the single process's.
    torch.testing.assert_close(torch.cat([r0["codes"], r1["codes"]]), sinkhorn(r0["scores_all"]), rtol=1e-5,
                               atol=1e-7)
    # A real SupCon run, labels gathered from both ranks: both step the same weights.
    for key in (k for k in params(r0["state"]) if "running_" not in k):
        torch.testing.assert_close(r0["state"][key], r1["state"][key], rtol=0, atol=0, msg=key)
    assert math.isfinite(r0["loss"]) and load_checkpoint(tmp_path / "m" / CHECKPOINT)["classes"] == \
        ["part0", "part1", "part2"]


def test_ddp_nnclr_queue_and_meanshift_bank_hold_the_global_batch_and_equal_on_every_rank(tmp_path, train_dir):
    import torch.multiprocessing as mp

    import _ddp_worker
    from filterkit.methods.meanshift import mean_shift_loss
    from filterkit.methods.nnclr import nearest_neighbour, nnclr_infonce

    mp.start_processes(_ddp_worker.run_banks, args=(2, _free_port(), str(train_dir), str(tmp_path / "m"),
                                                    str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"banks{r}.pt", weights_only=True) for r in (0, 1))
    # NNCLR: one process over the global batch gives the same loss, and DDP's average of the
    # ranks' gradients is its gradient (the negatives p̄_k are both ranks').
    p = r0["p_all"].clone().requires_grad_(True)
    single = nnclr_infonce(nearest_neighbour(r0["z_all"], r0["support"]), p, 0.2)
    single.backward()
    torch.testing.assert_close(r0["nn_loss"], single.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([r0["nn_grad"], r1["nn_grad"]]) / 2, p.grad, rtol=1e-4, atol=1e-6)
    # Mean Shift: the bank holds both ranks' targets before the lookup, so a rank's neighbours
    # may be the other rank's rows: the single process's loss and gradient again.
    bank = EmbeddingQueue(16, 6)
    bank.push(r0["t_all"])
    q = r0["q_all"].clone().requires_grad_(True)
    single = mean_shift_loss(q, r0["t_all"], bank.contents(), k=2)
    single.backward()
    torch.testing.assert_close(r0["ms_loss"], single.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([r0["ms_grad"], r1["ms_grad"]]) / 2, q.grad, rtol=1e-4, atol=1e-6)
    # Each rank's queue and bank: the global batch in rank order (6 rows into 5: the last 5).
    assert torch.equal(r0["queue"]["rows"], r0["z_all"][1:])
    assert torch.equal(r0["bank"]["rows"][:6], r0["t_all"]) and int(r0["bank"]["filled"]) == 6
    for name in ("queue", "bank"):
        for key in ("rows", "ptr", "filled"):
            assert torch.equal(r0[name][key], r1[name][key]), (name, key)
    # Real runs, 2 steps of a global batch of 8: NNCLR pushes 8 rows a step, Mean Shift both views' 16
    # in every rank's buffers, equal on both ranks, as are the weights both ranks stepped.
    for method, buffer, per_step in (("nnclr", "queue", 8), ("meanshift", "bank", 16)):
        s0, s1 = r0[method]["state"], r1[method]["state"]
        assert int(s0[f"{buffer}.filled"]) == 2 * per_step, method
        for key in (k for k in s0 if k.startswith(f"{buffer}.")):
            assert torch.equal(s0[key], s1[key]), (method, key)
        for key in (k for k in params(s0) if "running_" not in k):
            torch.testing.assert_close(s0[key], s1[key], rtol=0, atol=0, msg=f"{method} {key}")
        assert math.isfinite(r0[method]["loss"]), method


def test_supcon_refuses_loose_images_and_a_resume_on_other_classes(tmp_path, train_dir, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(train_dir, data)
    opts = TrainOptions(max_steps=2, epochs=10, method="supcon", **TINY)
    pretrain(data, tmp_path / "m", opts, device="cpu", workers=0, progress=False, stop_at_step=1)
    (data / "part2").rename(data / "renamed")  # same images, another class list
    with pytest.raises(FilterkitError, match="has the classes part0, part1, renamed but the checkpoint was trained "
                                             "on part0, part1, part2"):
        pretrain(data, tmp_path / "m", TrainOptions(), resume=True, device="cpu", workers=0, progress=False)
    shutil.copy(next((data / "part0").iterdir()), data / "loose.png")
    assert main(["pretrain", str(data), "--out", str(tmp_path / "n"), "--method", "supcon", "--batch-size", "8",
                 "--max-steps", "1", "--workers", "0", "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 images lie directly in it (e.g. loose.png): move them into class folders" in err[0]


def test_labels_follow_the_image_actually_returned_and_the_in_memory_rows(tmp_path):
    from filterkit.augment import TwoViews
    from filterkit.train import _memory_batches, _TwoViewDataset

    bad = tmp_path / "a" / "bad.png"
    bad.parent.mkdir()
    bad.write_bytes(b"not an image")
    good = tmp_path / "b" / "good.png"
    good.parent.mkdir()
    sample_photo("astronaut").resize((40, 40)).save(good)
    dataset = _TwoViewDataset([bad, good], TwoViews(32, 0.08, (0.5,) * 3, (0.5,) * 3), 32, labels=[0, 1])
    _, _, failures, label, _ = dataset[(0, 5)]  # bad.png fails: good.png and its label stand in
    assert label == 1 and failures[0][0] == 0
    assert _TwoViewDataset([good], dataset.views, 32)[(0, 5)][3] is None

    class Views:
        def __call__(self, images, g):
            return images, images

        def local(self, images, g):
            return []

    store = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    got = list(_memory_batches(store, torch.tensor([1, 0, 1]), Views(), [(2, 0), (0, 1), (1, 2), (0, 3)], 2,
                               torch.device("cpu"), torch.tensor([7, 8, 9])))
    assert [b[3].tolist() for b in got] == [[9, 7], [8, 7]]


@pytest.mark.parametrize("queue", [None, 0])
def test_the_default_method_trains_as_it_did_before_methods_existed(tmp_path, train_dir, queue):
    # Recorded from the single-module trainer (before --method): 3 steps, seed 3. On that machine
    # the refactored trainer reproduced them bit for bit; the tolerance only allows for other CPUs.
    # --queue 0, given or not, is that trainer too.
    opts = TrainOptions(max_steps=3, epochs=10, seed=3, queue=queue, **TINY)
    result = pretrain(train_dir, tmp_path / "m", opts, device="cpu", workers=0, progress=False)
    log = [json.loads(line) for line in (tmp_path / "m" / "training" / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log] == pytest.approx([2.6649575233459473, 1.8984822034835815, 2.3585705757141113],
                                                     rel=1e-4)
    total = sum(float(v.double().abs().sum()) for v in result.model.state_dict().values() if v.is_floating_point())
    assert total == pytest.approx(22347.658336933262, rel=1e-5)
    assert type(result.model).__name__ == "MoCo"


def test_a_checkpoint_from_before_methods_resumes_as_moco_v3(tmp_path, train_dir):
    out = tmp_path / "m"
    pretrain(train_dir, out, TrainOptions(max_steps=2, epochs=10, **TINY), device="cpu", workers=0, progress=False,
             stop_at_step=1)
    state = torch.load(out / CHECKPOINT, weights_only=True)
    options = json.loads(state["options"])
    del options["method"]  # as written before --method existed
    state["options"] = json.dumps(options)
    torch.save(state, out / CHECKPOINT)
    with pytest.raises(FilterkitError, match=r"method \(checkpoint 'moco-v3', now 'simclr'\)"):
        pretrain(train_dir, out, TrainOptions(method="simclr"), resume=True, device="cpu", workers=0, progress=False)
    resumed = pretrain(train_dir, out, TrainOptions(), resume=True, device="cpu", workers=0, progress=False)
    assert resumed.steps == 2 and type(resumed.model).__name__ == "MoCo"
    assert load_checkpoint(out / CHECKPOINT)["options"]["method"] == "moco-v3"


def test_moco_queue_trains_with_finite_losses_and_resumes_exactly_with_its_queue(tmp_path, train_dir):
    # 20 keys, 16 pushed per step (2 views x batch 8): not a multiple, so the ring wraps mid-batch.
    opts = TrainOptions(max_steps=4, epochs=10, queue=20, **TINY)
    straight = pretrain(train_dir, tmp_path / "a", opts, device="cpu", workers=0, progress=False)
    log = [json.loads(line) for line in (tmp_path / "a" / "training" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in log)
    assert json.loads((tmp_path / "a" / CONFIG_FILE).read_text())["training"]["queue"] == 20
    queue = straight.model.queue
    assert (int(queue.filled), int(queue.ptr)) == (20, 4 * 16 % 20)
    torch.testing.assert_close(queue.rows.norm(dim=1), torch.ones(20))  # unit keys, every row written

    pretrain(train_dir, tmp_path / "b", opts, device="cpu", workers=0, progress=False, stop_at_step=2)
    saved = load_checkpoint(tmp_path / "b" / CHECKPOINT)
    assert saved["options"]["queue"] == 20 and int(saved["model"]["queue.ptr"]) == 2 * 16 % 20
    with pytest.raises(FilterkitError, match=r"differ from the checkpoint: queue \(checkpoint 20, now 0\)"):
        pretrain(train_dir, tmp_path / "b", TrainOptions(queue=0), resume=True, device="cpu", workers=0,
                 progress=False)
    resumed = pretrain(train_dir, tmp_path / "b", TrainOptions(), resume=True, device="cpu", workers=0,
                       progress=False)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert resumed.steps == 4 and a.keys() == b.keys() and "queue.rows" in a
    for key in a:  # the queue's rows, pointer and fill count included
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    # A queue changes the loss from the first step that has one (the second).
    plain = pretrain(train_dir, tmp_path / "c", TrainOptions(max_steps=2, epochs=10, **TINY), device="cpu",
                     workers=0, progress=False)
    plain_log = [json.loads(line) for line in (tmp_path / "c" / "training" / "log.jsonl").read_text().splitlines()]
    assert plain_log[0]["loss"] == pytest.approx(log[0]["loss"], rel=1e-6) and plain_log[1]["loss"] != log[1]["loss"]
    assert plain.model.queue is None


def test_moco_queue_errors_are_one_line_and_a_checkpoint_from_before_resumes_without_one(tmp_path, train_dir,
                                                                                         capsys):
    common = ["pretrain", str(train_dir), "--out", str(tmp_path / "m"), "--batch-size", "8", "--max-steps", "1",
              "--workers", "0", "-q"]
    assert main([*common, "--queue", "-1"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --queue must be 0 (no queue) or a positive number of keys, got -1"]
    assert main([*common, "--queue", "64", "--method", "nnclr"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --queue 64 is moco-v3's queue of negative keys: --method nnclr does not take it (leave out --queue)"]
    assert not (tmp_path / "m").exists()
    # A checkpoint written before --queue existed has no "queue" option: it resumes as queue 0.
    out = tmp_path / "old"
    pretrain(train_dir, out, TrainOptions(max_steps=2, epochs=10, **TINY), device="cpu", workers=0, progress=False,
             stop_at_step=1)
    state = torch.load(out / CHECKPOINT, weights_only=True)
    options = json.loads(state["options"])
    del options["queue"]
    state["options"] = json.dumps(options)
    torch.save(state, out / CHECKPOINT)
    with pytest.raises(FilterkitError, match=r"queue \(checkpoint 0, now 8\)"):
        pretrain(train_dir, out, TrainOptions(queue=8), resume=True, device="cpu", workers=0, progress=False)
    resumed = pretrain(train_dir, out, TrainOptions(), resume=True, device="cpu", workers=0, progress=False)
    assert resumed.steps == 2 and resumed.model.queue is None


def test_init_from_a_queued_moco_run_continues_its_queue_unless_the_method_changes(tmp_path, train_dir):
    pretrain(train_dir, tmp_path / "q", TrainOptions(max_steps=1, epochs=10, queue=24, **TINY), device="cpu",
             workers=0, progress=False)
    again = pretrain(train_dir, tmp_path / "again", TrainOptions(max_steps=1, init_from=str(tmp_path / "q"),
                                                                 batch_size=8), device="cpu", workers=0,
                     progress=False)
    doc = json.loads((tmp_path / "again" / CONFIG_FILE).read_text())["training"]
    assert (doc["queue"], doc["init"]["loaded"]) == (24, "encoders and heads")
    assert int(again.model.queue.filled) == 24  # 16 from the init run, 16 more here
    other = pretrain(train_dir, tmp_path / "simclr", TrainOptions(max_steps=1, init_from=str(tmp_path / "q"),
                                                                  method="simclr", batch_size=8), device="cpu",
                     workers=0, progress=False)
    doc = json.loads((tmp_path / "simclr" / CONFIG_FILE).read_text())["training"]
    assert (doc["queue"], doc["init"]["loaded"]) == (0, "backbone") and isinstance(other.model, SimCLR)


def test_init_from_with_another_queue_size_keeps_the_trained_heads_and_starts_the_queue_empty(tmp_path, train_dir,
                                                                                              monkeypatch):
    import filterkit.train.loop as loop

    pretrain(train_dir, tmp_path / "plain", TrainOptions(max_steps=1, epochs=10, **TINY), device="cpu", workers=0,
             progress=False)
    trained = load_checkpoint(tmp_path / "plain" / CHECKPOINT)["model"]
    loaded = {}

    def apply(method, init, options):  # the state right after the init is applied, before any step
        what = checkpoints._apply_init(method, init, options)
        loaded.update({k: v.clone() for k, v in method.state_dict().items()})
        return what

    from filterkit.train import checkpoints

    monkeypatch.setattr(loop, "_apply_init", apply)
    pretrain(train_dir, tmp_path / "queued", TrainOptions(max_steps=1, init_from=str(tmp_path / "plain"), queue=16,
                                                          batch_size=8), device="cpu", workers=0, progress=False)
    doc = json.loads((tmp_path / "queued" / CONFIG_FILE).read_text())["training"]
    assert (doc["queue"], doc["init"]["loaded"]) == (16, "encoders and heads (an empty queue)")
    assert set(loaded) - set(trained) == {"queue.rows", "queue.ptr", "queue.filled"}
    for key, value in trained.items():  # backbone, projector, predictor and the momentum encoder
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)
    assert int(loaded["queue.filled"]) == 0


def test_ddp_moco_queue_is_the_global_batchs_and_equal_on_every_rank(tmp_path, train_dir):
    import torch.multiprocessing as mp

    import _ddp_worker
    from filterkit.moco import contrastive_loss

    mp.start_processes(_ddp_worker.run_moco_queue, args=(2, _free_port(), str(train_dir), str(tmp_path / "m"),
                                                         str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"queue{r}.pt", weights_only=True) for r in (0, 1))
    single = contrastive_loss(r0["q_all"], r0["k_all"], 0.2, r0["queue"])  # one process, the global batch
    torch.testing.assert_close(r0["mean_loss"], single, rtol=1e-5, atol=1e-6)
    s0, s1 = r0["state"], r1["state"]
    assert (int(s0["queue.filled"]), int(s0["queue.ptr"])) == (20, 2 * 16 % 20)
    for key in ("queue.rows", "queue.ptr", "queue.filled"):
        assert torch.equal(s0[key], s1[key]), key
    for key in (k for k in params(s0) if "running_" not in k):
        torch.testing.assert_close(s0[key], s1[key], rtol=0, atol=0, msg=key)
    assert math.isfinite(r0["loss"]) and load_checkpoint(tmp_path / "m" / CHECKPOINT)["options"]["queue"] == 20
