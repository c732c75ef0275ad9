"""Multi-crop (`pretrain --local-crops N`, Caron et al. 2020, section 3.2): the local grid's
positions, the ViT at the local side against plain timm built for it, each supported method's
loss against its formula written out, the views of both augmentation paths, training, resume,
N = 0 unchanged, and the refusals."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from filterkit import FilterkitError
from filterkit.augment import BatchTwoViews, TwoViews, _crop_boxes, default_local_crop_size
from filterkit.cli import main
from filterkit.encoder import build_backbone, forward_any_side, grid_pos_embed, sincos_pos_embed
from filterkit.methods.base import cross_view_pairs
from filterkit.methods.byol import BYOL
from filterkit.methods.simsiam import SimSiam
from filterkit.methods.swav import SwAV, multicrop_swapped_prediction, sinkhorn
from filterkit.moco import MoCo
from filterkit.modeldir import CONFIG_FILE, WEIGHTS_FILE, ModelConfig
from filterkit.train import CHECKPOINT, TrainOptions, load_checkpoint, pretrain
from test_moco import reference_ctr, reference_ctr_with_queue
from test_train import TINY, params

HEADS = dict(out_dim=16, proj_hidden=32)


def _tiny(preset="vit-mini-8-32"):
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset, depth=1)
    return build_backbone(cfg), cfg


def _plain_at(backbone, cfg, side):
    """A plain timm ViT built for ``side`` px (its own sin-cos table), with ``backbone``'s weights."""
    small = replace(cfg, img_size=side)
    plain = build_backbone(small)
    state = {k: v for k, v in backbone.state_dict().items() if k != "pos_embed"}
    plain.load_state_dict({**state, "pos_embed": sincos_pos_embed(small)}, strict=True)
    return plain


def _unit(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def reference_terms(loss, predictions, targets):
    """Caron et al. 2020, 3.2: each view's prediction against the target of each global view
    (targets[0], targets[1]) other than itself."""
    return [loss(p, target) for s, target in enumerate(targets) for t, p in enumerate(predictions) if t != s]


def test_the_local_grid_embedding_is_timms_sincos_table_for_that_grid():
    from timm.layers import build_sincos2d_pos_embed

    for grid, dim in ((2, 192), (3, 96), (6, 192)):
        got = grid_pos_embed(grid, dim)
        assert got.shape == (1, 1 + grid * grid, dim) and not got[0, 0].any()  # the class row is zero
        torch.testing.assert_close(got[0, 1:], build_sincos2d_pos_embed([grid, grid], dim=dim), rtol=0, atol=0)
    cfg = ModelConfig.from_preset("vit-mini-8-32")
    assert torch.equal(sincos_pos_embed(cfg), grid_pos_embed(4, cfg.embed_dim))
    with torch.device("meta"):  # as Encoder.load's shape check builds it: later tables stay real
        assert grid_pos_embed(4, cfg.embed_dim).is_meta
    assert not grid_pos_embed(4, cfg.embed_dim).is_meta


@pytest.mark.parametrize("preset", ["vit-mini-8-32", "vit-mini-conv-8-32"])  # patch embedding; conv stem
def test_the_backbone_at_any_side_is_plain_timm_built_for_that_side(preset):
    backbone, cfg = _tiny(preset)
    backbone.eval()
    x, local = torch.randn(3, 3, 32, 32), torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(forward_any_side(backbone, x), backbone(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(forward_any_side(backbone, local), _plain_at(backbone, cfg, 16)(local),
                                   rtol=0, atol=1e-6)
    assert backbone.pos_embed.shape == (1, 17, cfg.embed_dim)  # the saved table is still the 32-px one


def test_default_local_size_is_3_7_of_the_side_rounded_to_the_token_stride():
    assert default_local_crop_size(224, 16) == 96  # SwAV's 96 of 224
    assert default_local_crop_size(32, 8) == 16 and default_local_crop_size(32, 4) == 12
    assert default_local_crop_size(64, 8) == 24 and default_local_crop_size(16, 8) == 8


def _local_inputs(model, cfg, x1, x2, local):
    """The projections z of the global and local views, the local ones through plain timm."""
    with torch.no_grad():
        z1, z2, _ = model.base(x1, x2)
        if not local:
            return [z1, z2]
        plain = _plain_at(model.base.backbone, cfg, local[0].shape[-1])
        return [z1, z2] + [model.base.projector(plain(v)) for v in local]


@pytest.mark.parametrize("n_local", [0, 3])  # 0: MoCo v3's symmetric ctr(q1, k2) + ctr(q2, k1)
def test_moco_v3_local_queries_against_both_global_keys_equal_the_formula(n_local):
    backbone, cfg = _tiny()
    model = MoCo(backbone, cfg.embed_dim, pred_hidden=32, **HEADS)
    x1, x2 = torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32)
    local = [torch.randn(6, 3, 16, 16) for _ in range(n_local)]
    loss, features = model(x1, x2, local_views=local)
    zs = _local_inputs(model, cfg, x1, x2, local)
    with torch.no_grad():
        q = [model.predictor(z).numpy() for z in zs]
        k1, k2, _ = model.momentum(x1, x2)
    terms = reference_terms(lambda a, b: reference_ctr(a, b, 0.2), q, [k1.numpy(), k2.numpy()])
    assert len(terms) == 2 + 2 * n_local
    assert float(loss.detach()) == pytest.approx(2 / len(terms) * sum(terms), rel=1e-5)
    assert features.shape == (12, cfg.embed_dim)  # the global views' features only
    loss.backward()
    assert model.base.backbone.blocks[0].attn.qkv.weight.grad is not None
    assert all(p.grad is None for p in model.momentum.parameters())


def test_moco_v3_local_queries_with_a_queue_take_its_rows_as_negatives_and_push_the_global_keys():
    backbone, cfg = _tiny()
    model = MoCo(backbone, cfg.embed_dim, pred_hidden=32, queue_size=10, **HEADS)
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    local = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    queued = torch.nn.functional.normalize(torch.randn(6, 16), dim=1)
    model.queue.push(queued)
    loss, _ = model(x1, x2, local_views=local)
    zs = _local_inputs(model, cfg, x1, x2, local)
    with torch.no_grad():
        q = [model.predictor(z).numpy() for z in zs]
        k1, k2, _ = model.momentum(x1, x2)
    terms = reference_terms(lambda a, b: reference_ctr_with_queue(a, b, queued.numpy(), 0.2), q,
                            [k1.numpy(), k2.numpy()])
    assert float(loss.detach()) == pytest.approx(2 / len(terms) * sum(terms), rel=1e-5)
    # after the loss, the global views' keys only were pushed (k̄1 then k̄2, wrapping the ring of 10
    # after the 6 queued rows), not the local views' queries
    unit = torch.nn.functional.normalize
    torch.testing.assert_close(model.queue.rows[6:10], unit(k1, dim=1), rtol=0, atol=1e-6)
    torch.testing.assert_close(model.queue.rows[0:4], unit(k2, dim=1), rtol=0, atol=1e-6)
    torch.testing.assert_close(model.queue.rows[4:6], queued[4:6], rtol=0, atol=0)
    assert int(model.queue.filled) == 10


@pytest.mark.parametrize("n_local", [0, 2])  # 0: the papers' symmetric two-view losses
def test_byol_and_simsiam_local_predictions_against_the_global_targets_equal_the_formulas(n_local):
    x1, x2 = torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32)
    local = [torch.randn(6, 3, 16, 16) for _ in range(n_local)]

    def sq(p, z):  # BYOL's ‖p̄ − z̄‖², per image, averaged
        return float(np.mean(np.sum((_unit(p) - _unit(z)) ** 2, axis=1)))

    def d(p, z):  # SimSiam's D = −p̄·z̄, averaged
        return float(np.mean(-np.sum(_unit(p) * _unit(z), axis=1)))

    backbone, cfg = _tiny()
    byol = BYOL(backbone, cfg.embed_dim, pred_hidden=32, **HEADS)
    loss, _ = byol(x1, x2, local_views=local)
    with torch.no_grad():
        p = [byol.predictor(z).numpy() for z in _local_inputs(byol, cfg, x1, x2, local)]
        t1, t2, _ = byol.target(x1, x2)
    terms = reference_terms(sq, p, [t1.numpy(), t2.numpy()])
    assert float(loss.detach()) == pytest.approx(2 / len(terms) * sum(terms), rel=1e-5)

    backbone, cfg = _tiny()
    simsiam = SimSiam(backbone, cfg.embed_dim, **HEADS)
    loss, _ = simsiam(x1, x2, local_views=local)
    zs = _local_inputs(simsiam, cfg, x1, x2, local)
    with torch.no_grad():
        p = [simsiam.predictor(z).numpy() for z in zs]
    terms = reference_terms(d, p, [zs[0].numpy(), zs[1].numpy()])
    assert float(loss.detach()) == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_swav_multicrop_loss_equals_the_papers_loop_and_codes_come_from_the_global_views():
    rng = np.random.default_rng(7)
    scores = [rng.uniform(-1, 1, size=(6, 5)) for _ in range(4)]  # 2 global + 2 local views
    as_t = lambda a: torch.tensor(a, dtype=torch.float32)
    codes = [sinkhorn(as_t(s)).numpy() for s in scores[:2]]

    def ell(s, q, tau=0.1):  # −Σ_k q_k log softmax(s/τ)_k, averaged over the images
        return np.mean([-sum(qk * (sk / tau - math.log(sum(math.exp(v / tau) for v in si)))
                             for qk, sk in zip(qi, si)) for si, qi in zip(s, q)])

    # The paper's code: for each global view s, the mean over the other V − 1 views; then the mean over s.
    expected = np.mean([np.mean([ell(scores[t], codes[s]) for t in range(4) if t != s]) for s in range(2)])
    got = multicrop_swapped_prediction([as_t(s) for s in scores], [as_t(q) for q in codes], 0.1)
    assert float(got) == pytest.approx(expected, rel=1e-5)

    backbone, cfg = _tiny()
    model = SwAV(backbone, cfg.embed_dim, prototypes=10, **HEADS)
    x1, x2 = torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32)
    local = [torch.randn(6, 3, 16, 16) for _ in range(2)]
    loss, _ = model(x1, x2, local_views=local)
    c = _unit(model.prototypes.weight.detach().numpy())
    s = [_unit(z.numpy()) @ c.T for z in _local_inputs(model, cfg, x1, x2, local)]
    q = [sinkhorn(as_t(v)).numpy() for v in s[:2]]
    expected = np.mean([np.mean([ell(s[t], q[g]) for t in range(4) if t != g]) for g in range(2)])
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-4)


def test_no_local_views_given_and_an_empty_list_compute_the_same():
    """(Against the formulas: the n_local = 0 cases of the tests above and the methods' own tests.)"""
    assert cross_view_pairs(2) == [(1, 0), (0, 1)] and len(cross_view_pairs(6)) == 10
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    for build in (lambda b, d: MoCo(b, d, pred_hidden=32, **HEADS), lambda b, d: BYOL(b, d, pred_hidden=32, **HEADS),
                  lambda b, d: SimSiam(b, d, **HEADS), lambda b, d: SwAV(b, d, prototypes=10, **HEADS)):
        backbone, cfg = _tiny()
        model = build(backbone, cfg.embed_dim)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        a = model(x1, x2)[0]
        model.load_state_dict(state)  # the BN running statistics and the prototypes as they were
        b = model(x1, x2, local_views=[])[0]
        assert torch.equal(a, b)


def test_both_augmentation_paths_add_local_views_after_the_global_ones():
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8))
    plain, multi = TwoViews(32, 0.2), TwoViews(32, 0.2, local_crops=3, local_size=16)
    torch.manual_seed(1)
    a = plain(image)
    assert plain.local(image) == []
    torch.manual_seed(1)
    b = multi(image)
    local = multi.local(image)
    assert all(torch.equal(u, v) for u, v in zip(a, b))  # the global views do not move
    assert len(local) == 3 and all(v.shape == (3, 16, 16) for v in local) and not torch.equal(local[0], local[1])

    images = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8)
    plain_b, multi_b = BatchTwoViews(32, 0.2), BatchTwoViews(32, 0.2, local_crops=2, local_size=16)
    ga, gb = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert all(torch.equal(u, v) for u, v in zip(plain_b(images, ga), multi_b(images, gb)))
    assert plain_b.local(images, ga) == []
    local = multi_b.local(images, gb)
    assert len(local) == 2 and all(v.shape == (5, 3, 16, 16) for v in local)
    boxes = _crop_boxes(2000, 64, 64, 0.05, torch.Generator().manual_seed(0), "cpu", max_scale=0.2)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / 64 ** 2
    assert 0.05 <= float(area.min()) < 0.06 and 0.19 < float(area.max()) <= 0.2 + 1e-6


@pytest.mark.parametrize("method,in_memory", [("moco-v3", False), ("swav", False), ("byol", True),
                                              ("simsiam", False)])
def test_local_crops_train_finite_export_a_plain_timm_model_and_resume_exactly(tmp_path, train_dir, method,
                                                                                in_memory):
    import timm
    from safetensors.torch import load_file

    opts = TrainOptions(max_steps=4, epochs=10, method=method, local_crops=2, data_in_memory=in_memory or None,
                        **TINY)
    straight = pretrain(train_dir, tmp_path / "a", opts, device="cpu", workers=0, progress=False)
    log = [json.loads(line) for line in (tmp_path / "a" / "training" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in log)
    doc = json.loads((tmp_path / "a" / CONFIG_FILE).read_text())
    assert (doc["training"]["local_crops"], doc["training"]["local_crop_size"]) == (2, 16)
    plain = timm.create_model(doc["timm"]["model_name"], pretrained=False, **doc["timm"]["kwargs"])
    plain.load_state_dict(load_file(tmp_path / "a" / WEIGHTS_FILE), strict=True)

    pretrain(train_dir, tmp_path / "b", opts, device="cpu", workers=0, progress=False, stop_at_step=2)
    assert load_checkpoint(tmp_path / "b" / CHECKPOINT)["options"]["local_crop_size"] == 16
    with pytest.raises(FilterkitError, match=r"local_crops \(checkpoint 2, now 0\)"):
        pretrain(train_dir, tmp_path / "b", TrainOptions(local_crops=0), resume=True, device="cpu", workers=0,
                 progress=False)
    resumed = pretrain(train_dir, tmp_path / "b", TrainOptions(), resume=True, device="cpu", workers=1,
                       progress=False)  # a worker process: the views do not depend on who draws them
    a, b = params(straight.model.state_dict()), params(resumed.model.state_dict())
    assert resumed.steps == 4 and a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_local_crops_change_the_training(tmp_path, train_dir):
    two = pretrain(train_dir, tmp_path / "a", TrainOptions(max_steps=2, epochs=10, **TINY), device="cpu", workers=0,
                   progress=False)
    multi = pretrain(train_dir, tmp_path / "b", TrainOptions(max_steps=2, epochs=10, local_crops=2, **TINY),
                     device="cpu", workers=0, progress=False)
    assert multi.final_loss != two.final_loss
    assert json.loads((tmp_path / "a" / CONFIG_FILE).read_text())["training"]["local_crops"] == 0


@pytest.mark.parametrize("extra,message", [
    (dict(method="simclr"), "--local-crops is not supported by simclr (it is by moco-v3, byol, simsiam, swav)"),
    (dict(method="meanshift"), "--local-crops is not supported by meanshift"),
    (dict(local_crop_size=12), "--local-crop-size 12 does not fit the 32 px model: a local view's side must be a "
                               "multiple of its 8 px per token and smaller than 32 (e.g. 16)"),
    (dict(local_crop_size=32), "--local-crop-size 32 does not fit the 32 px model"),
    (dict(min_crop_scale=0.05), "raise --min-crop-scale above 0.05"),
    (dict(local_crops=0, local_crop_size=16), "--local-crop-size sets the side of the local views: give "
                                              "--local-crops N too"),
])
def test_local_crops_refuse_what_cannot_run_before_any_work(tmp_path, train_dir, extra, message):
    opts = TrainOptions(max_steps=1, **{**TINY, "local_crops": 2, **extra})
    with pytest.raises(FilterkitError, match=None) as e:
        pretrain(train_dir, tmp_path / "m", opts, device="cpu", workers=0, progress=False)
    assert message in str(e.value)
    assert not (tmp_path / "m").exists()


def test_cli_local_crops_run_and_refusal(tmp_path, train_dir, capsys):
    args = ["pretrain", str(train_dir), "--preset", "vit-mini-8-32", "--depth", "1", "--batch-size", "8",
            "--max-steps", "1", "--workers", "0", "-q", "--local-crops", "2"]
    assert main(args + ["--out", str(tmp_path / "m"), "--local-crop-size", "8"]) == 0
    assert json.loads((tmp_path / "m" / CONFIG_FILE).read_text())["training"]["local_crop_size"] == 8
    capsys.readouterr()
    assert main(args + ["--out", str(tmp_path / "n"), "--method", "nnclr"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--local-crops is not supported by nnclr" in err[0]


def test_ddp_multicrop_shares_the_gathered_keys_and_keeps_the_ranks_identical(tmp_path, train_dir):
    import torch.multiprocessing as mp

    import _ddp_worker
    from filterkit.moco import contrastive_loss
    from test_train import _free_port

    mp.start_processes(_ddp_worker.run_multicrop, args=(2, _free_port(), str(train_dir), str(tmp_path / "m"),
                                                        str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"multicrop{r}.pt", weights_only=True) for r in (0, 1))
    # One process over the global batch: several queries against the same keys, each its own ctr.
    single = sum(contrastive_loss(q, r0["k_all"], 0.2) for q in r0["queries_all"])
    torch.testing.assert_close(r0["mean_loss"], single, rtol=1e-5, atol=1e-6)
    for method in ("moco-v3", "swav"):  # real runs with 2 local views: both ranks step the same weights
        s0, s1 = r0[method]["state"], r1[method]["state"]
        assert math.isfinite(r0[method]["loss"]) and math.isfinite(r1[method]["loss"])
        for key in (k for k in params(s0) if "running_" not in k):
            torch.testing.assert_close(s0[key], s1[key], rtol=0, atol=0, msg=f"{method} {key}")
        options = load_checkpoint(tmp_path / "m" / method / CHECKPOINT)["options"]
        assert options["local_crops"] == 2
    assert torch.equal(r0["moco-v3"]["state"]["queue.rows"], r1["moco-v3"]["state"]["queue.rows"])
