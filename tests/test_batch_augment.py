"""The batched, in-memory augmentation path (BatchTwoViews) and training from memory."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import sample_photo
from filterkit.augment import IMAGENET_MEAN, IMAGENET_STD, BatchTwoViews, batch_view, store_size
from filterkit.modeldir import CONFIG_FILE
from filterkit.train import TrainOptions, pretrain

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def photos(n=6, side=64):
    photo = sample_photo("astronaut")
    crops = [photo.crop((i * 40, i * 30, i * 40 + 256, i * 30 + 256)).resize((side, side)) for i in range(n)]
    return torch.stack([torch.from_numpy(np.array(c)).permute(2, 0, 1) for c in crops])


def unnormalise(x):
    return x * STD + MEAN


def g(seed=0):
    return torch.Generator().manual_seed(seed)


def test_crop_boxes_are_pixel_edges_x_then_y():
    from filterkit.augment import _resample

    x = photos(2, 64)
    boxes = torch.tensor([[8.0, 4.0, 40.0, 36.0], [0.0, 16.0, 64.0, 48.0]])  # x0, y0, x1, y1
    out = _resample(x, boxes, 16)
    f = x.float() / 255
    # a 2x shrink of a box on pixel edges is exactly a 2x2 average of the box's pixels
    torch.testing.assert_close(out[0], F.avg_pool2d(f[0:1, :, 4:36, 8:40], 2)[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], F.avg_pool2d(f[1:2, :, 16:48, 0:64], (2, 4))[0], atol=1e-5, rtol=0)


def test_full_area_crop_is_the_whole_image_resized_up_to_a_flip():
    x = photos()
    out = unnormalise(batch_view(x, 32, min_scale=1.0, g=g(), jitter_p=0, grey_p=0))
    ref = F.avg_pool2d(x.float() / 255, 2)
    for i in range(len(x)):
        err = min((out[i] - ref[i]).abs().max(), (out[i].flip(2) - ref[i]).abs().max())
        assert err < 1e-4


def test_same_seed_same_views_and_the_two_views_differ():
    x = photos()
    a1, a2 = BatchTwoViews(32, 0.2)(x, g(3))
    b1, b2 = BatchTwoViews(32, 0.2)(x, g(3))
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert a1.shape == a2.shape == (len(x), 3, 32, 32) and a1.dtype == torch.float32
    assert not torch.allclose(a1, a2)
    c1, _ = BatchTwoViews(32, 0.2)(x, g(4))
    assert not torch.allclose(a1, c1)


def test_grey_solarize_and_jitter_do_what_they_say():
    x = photos()
    grey = unnormalise(batch_view(x, 32, 1.0, g(), jitter_p=0, grey_p=1.0))
    assert torch.allclose(grey[:, 0], grey[:, 1], atol=1e-5) and torch.allclose(grey[:, 1], grey[:, 2], atol=1e-5)
    flat = torch.full((4, 3, 16, 16), 204, dtype=torch.uint8)  # 0.8 everywhere
    solar = unnormalise(batch_view(flat, 16, 1.0, g(), jitter_p=0, grey_p=0, solarize_p=1.0))
    assert torch.allclose(solar, torch.full_like(solar, 0.2), atol=1e-4)
    plain = unnormalise(batch_view(x, 32, 1.0, g(1), jitter_p=0, grey_p=0))
    jittered = unnormalise(batch_view(x, 32, 1.0, g(1), jitter_p=1.0, grey_p=0))
    assert jittered.min() >= 0 and jittered.max() <= 1
    per_image = (jittered - plain).abs().flatten(1).mean(1)
    assert (per_image > 0.005).all()  # every image's colours moved


def test_blur_matches_torchvision_and_only_large_views_get_it():
    from torchvision.transforms.v2 import functional as TF

    from filterkit.augment import _gaussian_blur

    x = photos(3, 48).float() / 255
    sigma = torch.tensor([0.5, 1.0, 2.0])
    out = _gaussian_blur(x, sigma, 7)
    for i in range(3):
        ref = TF.gaussian_blur(x[i], [7, 7], [float(sigma[i])] * 2)
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)
    assert BatchTwoViews(32).view1["blur_p"] == 0 and BatchTwoViews(224).view1["blur_p"] == 1.0
    assert BatchTwoViews(224).view2["blur_p"] == 0.1 and BatchTwoViews(224).view2["solarize_p"] == 0.2
    assert store_size(32) == 64 and store_size(224) == 256


def test_jitter_factors_stay_in_colorjitter_ranges():
    from filterkit.augment import _jitter

    flat = torch.full((64, 3, 4, 4), 0.5)  # grey: contrast, saturation and hue leave it alone
    out = _jitter(flat, torch.ones(64, dtype=torch.bool), g(7))
    brightness = out[:, 0, 0, 0] / 0.5
    assert brightness.min() >= 0.6 - 1e-5 and brightness.max() <= 1.4 + 1e-5
    assert brightness.max() - brightness.min() > 0.5  # spread over the range, per image
    assert torch.allclose(out[:, 0], out[:, 1], atol=1e-5)  # hue of a grey stays grey
    untouched = _jitter(flat, torch.zeros(64, dtype=torch.bool), g(7))
    assert torch.equal(untouched, flat)


@pytest.fixture(scope="module")
def linked_dir(tmp_path_factory):
    """12 photos plus a second folder of links to them (a repeated dataset) and one bad file."""
    root = tmp_path_factory.mktemp("mem")
    photo = sample_photo("coffee")
    (root / "a").mkdir()
    (root / "b").mkdir()
    for i in range(12):
        photo.crop((i * 20, i * 10, i * 20 + 200, i * 10 + 200)).resize((48, 48)).save(root / "a" / f"{i}.png")
        (root / "b" / f"{i}.png").symlink_to(root / "a" / f"{i}.png")
    (root / "a" / "broken.png").write_bytes(b"not an image")
    (root / "b" / "dangling.png").symlink_to(root / "nowhere.png")
    return root


TINY = dict(preset="vit-mini-8-32", depth=1, batch_size=8, proj_hidden=32, pred_hidden=32, out_dim=16)


def test_training_from_memory_runs_resumes_exactly_and_stores_links_once(tmp_path, linked_dir, monkeypatch):
    import filterkit.train.data as train  # where the store is decoded

    stored = []
    real = train._decode_store

    def spy(*args, **kw):
        result = real(*args, **kw)
        stored.append(result)
        return result

    monkeypatch.setattr(train, "_decode_store", spy)
    opts = TrainOptions(max_steps=6, epochs=10, data_in_memory=True, **TINY)
    straight = pretrain(linked_dir, tmp_path / "a", opts, device="cpu", workers=0, progress=False)
    store, rows, kept, skips = stored[0]
    assert len(store) == 12 and len(kept) == 24 and sorted(set(rows.tolist())) == list(range(12))
    assert sorted(s.path.name for s in skips) == ["broken.png"]  # the dangling link is refused before decoding
    reasons = {s.path.name: s.reason for s in straight.skipped}
    assert "broken.png" in reasons and reasons["dangling.png"].startswith("broken symlink")

    pretrain(linked_dir, tmp_path / "b", opts, device="cpu", workers=0, progress=False, stop_at_step=3)
    resumed = pretrain(linked_dir, tmp_path / "b", TrainOptions(), resume=True, device="cpu", workers=0,
                       progress=False)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    assert json.loads((tmp_path / "a" / CONFIG_FILE).read_text())["training"]["data_in_memory"] is True


def test_memory_estimate_refuses_what_cannot_fit(tmp_path, linked_dir, monkeypatch):
    import filterkit.train.data as train  # where the store is decoded
    from filterkit import FilterkitError

    monkeypatch.setattr(train, "available_memory", lambda: 4096)
    with pytest.raises(FilterkitError, match="--data-in-memory needs"):
        pretrain(linked_dir, tmp_path / "m", TrainOptions(max_steps=1, data_in_memory=True, **TINY),
                 device="cpu", workers=0, progress=False)
