import json

import numpy as np
import pytest
import torch

from filterkit import PRESETS, Encoder, FilterkitError, ModelConfig
from filterkit.encoder import build_backbone
from filterkit.modeldir import CONFIG_FILE, WEIGHTS_FILE


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_build_and_embed_to_unit_vectors(preset):
    enc = Encoder.random(preset, depth=1)
    size = enc.config.img_size
    vecs = enc.embed(torch.randn(2, 3, size, size))
    assert vecs.shape == (2, enc.dim) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


def test_position_embedding_is_fixed_sincos_with_zero_class_row():
    model = build_backbone(ModelConfig.from_preset("vit-tiny-8-64", depth=1))
    pos = model.pos_embed
    assert not pos.requires_grad
    assert pos.shape == (1, 1 + 8 * 8, 192)
    assert torch.all(pos[0, 0] == 0)
    assert pos[0, 1:].abs().max() <= 1.0 and pos[0, 1:].std() > 0.3  # sin/cos values


def test_model_directory_round_trip(tmp_path, small_encoder, photos_dir):
    small_encoder.save(tmp_path / "m")
    loaded = Encoder.load(tmp_path / "m", device="cpu")
    assert loaded.model_id == small_encoder.model_id
    assert loaded.config == small_encoder.config
    paths = sorted(photos_dir.glob("*.jpg"))[:3]
    np.testing.assert_allclose(loaded.embed(paths), small_encoder.embed(paths), atol=1e-6)
    assert (tmp_path / "m" / "MODEL_CARD.md").read_text().startswith("# filterkit encoder")


def test_weights_load_into_plain_timm_with_strict(tmp_path, small_encoder):
    import timm
    from safetensors.torch import load_file

    small_encoder.save(tmp_path / "m")
    doc = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())
    plain = timm.create_model(doc["timm"]["model_name"], pretrained=False, **doc["timm"]["kwargs"])
    plain.load_state_dict(load_file(tmp_path / "m" / WEIGHTS_FILE), strict=True)
    plain.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = torch.nn.functional.normalize(plain(x), dim=-1).numpy()
    # fp32 for an exact comparison: --precision auto may run bf16 on this CPU (compared below)
    np.testing.assert_allclose(ours, Encoder.load(tmp_path / "m", device="cpu", precision="fp32").embed(x), atol=1e-5)


def test_embed_accepts_paths_pil_images_and_tensors_alike(photos_dir, small_encoder):
    from PIL import Image

    paths = sorted(photos_dir.glob("*.jpg"))[:2]
    from_paths = small_encoder.embed(paths)
    images = [Image.open(p) for p in paths]
    from_pil = small_encoder.embed(images)
    from_tensor = small_encoder.embed(torch.stack([small_encoder.transform(im.convert("RGB")) for im in images]))
    # Paths decode through JPEG draft mode, so allow a small difference from a full decode.
    assert np.all(np.sum(from_paths * from_pil, axis=1) > 0.99)
    np.testing.assert_allclose(from_pil, from_tensor, atol=1e-6)


def test_embed_rejects_a_tensor_of_the_wrong_size(small_encoder):
    with pytest.raises(FilterkitError, match="expected a tensor"):
        small_encoder.embed(torch.randn(1, 3, 32, 32))


def test_bf16_embeddings_stay_within_1e_2_cosine_of_fp32(small_encoder):
    bf16 = Encoder(small_encoder.backbone, small_encoder.config, device="cpu", precision="bf16")
    x = torch.randn(4, 3, 64, 64)
    cosine = np.sum(bf16.embed(x) * small_encoder.embed(x), axis=1)
    assert np.all(cosine > 1 - 1e-2)


def test_save_refuses_to_overwrite_without_permission(tmp_path, small_encoder):
    small_encoder.save(tmp_path / "m")
    with pytest.raises(FilterkitError, match="--force"):
        small_encoder.save(tmp_path / "m")
    small_encoder.save(tmp_path / "m", overwrite=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FilterkitError, match="not empty"):
        small_encoder.save(tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_fp16_weights_halve_the_file_and_load_as_fp32(tmp_path, small_encoder):
    small_encoder.save(tmp_path / "fp32")
    small_encoder.save(tmp_path / "fp16", weights_dtype=torch.float16)
    size32 = (tmp_path / "fp32" / WEIGHTS_FILE).stat().st_size
    size16 = (tmp_path / "fp16" / WEIGHTS_FILE).stat().st_size
    assert size16 < 0.55 * size32
    loaded = Encoder.load(tmp_path / "fp16", device="cpu")
    assert all(p.dtype == torch.float32 for p in loaded.backbone.parameters())
    for (name, a), (_, b) in zip(small_encoder.backbone.state_dict().items(), loaded.backbone.state_dict().items()):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4), name
    assert loaded.model_id != Encoder.load(tmp_path / "fp32", device="cpu").model_id
    with pytest.raises(FilterkitError, match="float16"):
        small_encoder.save(tmp_path / "int8", weights_dtype=torch.int8)


def test_load_explains_a_broken_model_directory(tmp_path, small_encoder):
    with pytest.raises(FilterkitError, match="not found"):
        Encoder.load(tmp_path / "missing")
    small_encoder.save(tmp_path / "m")
    config = tmp_path / "m" / CONFIG_FILE
    doc = json.loads(config.read_text())

    config.write_text("{not json")
    with pytest.raises(FilterkitError, match="malformed"):
        Encoder.load(tmp_path / "m")

    bad = dict(doc, architecture=dict(doc["architecture"], depth=100000))
    config.write_text(json.dumps(bad))
    with pytest.raises(FilterkitError, match="depth"):
        Encoder.load(tmp_path / "m")

    # Config says 3 blocks, weights hold 2: a mismatch, reported as such.
    wrong = dict(doc, architecture=dict(doc["architecture"], depth=3), weights_sha256=None)
    config.write_text(json.dumps(wrong))
    with pytest.raises(FilterkitError, match="does not fit config.json"):
        Encoder.load(tmp_path / "m")

    config.write_text(json.dumps(doc))
    weights = tmp_path / "m" / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(FilterkitError, match="sha256 differs"):
        Encoder.load(tmp_path / "m")


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(FilterkitError, match="unknown preset"):
        ModelConfig.from_preset("vit-huge-1-1")


def test_model_id_is_the_same_before_and_after_saving(tmp_path):
    enc = Encoder.random("vit-tiny-8-64", seed=3, depth=1)
    before = enc.model_id
    enc.save(tmp_path / "m")
    assert Encoder.load(tmp_path / "m").model_id == before


def test_a_pil_image_embeds_like_the_same_file(tmp_path, small_encoder):
    from PIL import Image

    rgba = Image.new("RGBA", (64, 64), (200, 20, 20, 0))
    rgba.paste((20, 20, 200, 255), (16, 16, 48, 48))
    rgba.save(tmp_path / "a.png")
    np.testing.assert_allclose(small_encoder.embed([rgba]), small_encoder.embed([tmp_path / "a.png"]), atol=1e-6)


def test_a_huge_config_next_to_small_weights_is_refused_before_allocating(tmp_path, small_encoder):
    """config.json may lie; the weights' header is checked against a meta-device model first,
    so a 1.5B-parameter request costs no memory (it would need ~6 GB)."""
    import subprocess
    import sys

    small_encoder.save(tmp_path / "m")
    config = tmp_path / "m" / CONFIG_FILE
    doc = json.loads(config.read_text())
    huge = dict(doc["architecture"], embed_dim=3200, num_heads=50, depth=12)
    config.write_text(json.dumps(dict(doc, architecture=huge, weights_sha256=None)))
    # In a fresh process, so that its peak memory is this load's alone.
    code = ("import resource, sys\nfrom filterkit import Encoder, FilterkitError\n"
            "try:\n    Encoder.load(sys.argv[1], device='cpu')\nexcept FilterkitError as e:\n    print(e)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")], capture_output=True, text=True)
    message, peak_kib = done.stdout.strip().splitlines()
    assert "does not fit config.json" in message and "shape of" in message
    assert int(peak_kib) < 2_000_000  # < 2 GB: torch + timm, not the ~6 GB the config asks for
    absurd = dict(doc["architecture"], embed_dim=4096, num_heads=64, depth=48)
    config.write_text(json.dumps(dict(doc, architecture=absurd, weights_sha256=None)))
    with pytest.raises(FilterkitError, match="refuses models above"):
        Encoder.load(tmp_path / "m", device="cpu")
    weights = tmp_path / "m" / WEIGHTS_FILE
    config.write_text(json.dumps(dict(doc, weights_sha256=None)))
    weights.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(FilterkitError, match="header length"):
        Encoder.load(tmp_path / "m", device="cpu")


def test_conv_stem_preset_has_16_tokens_and_loads_into_plain_timm(tmp_path):
    import timm
    from safetensors.torch import load_file
    from timm.layers import build_sincos2d_pos_embed

    enc = Encoder.random("vit-mini-conv-8-32", depth=1)
    pos = enc.backbone.pos_embed
    # 32 px / (stem stride 4 x patch 2) = a 4x4 grid of tokens, with the fixed sin-cos rows
    assert enc.config.token_stride == 8 and pos.shape == (1, 1 + 4 * 4, 192) and not pos.requires_grad
    torch.testing.assert_close(pos[0, 1:], build_sincos2d_pos_embed([4, 4], dim=192))
    enc.save(tmp_path / "m")
    assert "conv stem (stride 4) then patch 2" in (tmp_path / "m" / "MODEL_CARD.md").read_text()
    doc = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())
    plain = timm.create_model(doc["timm"]["model_name"], pretrained=False, **doc["timm"]["kwargs"])
    plain.load_state_dict(load_file(tmp_path / "m" / WEIGHTS_FILE), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = torch.nn.functional.normalize(plain.eval()(x), dim=-1).numpy()
    np.testing.assert_allclose(ours, Encoder.load(tmp_path / "m", device="cpu", precision="fp32").embed(x), atol=1e-5)


def test_image_size_must_divide_by_the_conv_stems_token_stride():
    with pytest.raises(FilterkitError, match="not divisible by patch_size 2 x stem stride 4"):
        ModelConfig.from_preset("vit-mini-conv-8-32", img_size=36)
