import json

import numpy as np
import pytest
import torch

from filterkit import Encoder
from filterkit.cli import main


def official_layout_checkpoint(path, backbone, arch="vit_small"):
    """A checkpoint shaped like facebookresearch/moco-v3's checkpoint_XXXX.pth.tar."""
    width = backbone.embed_dim
    sd = {}
    for k, v in backbone.state_dict().items():
        sd[f"module.base_encoder.{k}"] = v
        sd[f"module.momentum_encoder.{k}"] = v + 0.01
    for i, shape in enumerate([(64, width), (64,), (64,), (256, 64)]):
        sd[f"module.base_encoder.head.{i}.weight"] = torch.randn(shape)
        sd[f"module.momentum_encoder.head.{i}.weight"] = torch.randn(shape)
    sd["module.predictor.0.weight"] = torch.randn(64, 256)
    torch.save({"epoch": 300, "arch": arch, "state_dict": sd,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": []}]}}, path)


def test_import_official_moco_checkpoint_with_12_heads(tmp_path, capsys):
    import timm

    torch.manual_seed(0)
    # MoCo v3's ViT-Small: width 384 with 12 heads (timm's default has 6).
    reference = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=64,
                                  depth=2, num_heads=12).eval()
    official_layout_checkpoint(tmp_path / "checkpoint_0299.pth.tar", reference)
    assert main(["model", "import-moco", str(tmp_path / "checkpoint_0299.pth.tar"), "--out", str(tmp_path / "m")]) == 0
    assert "heads 12" in capsys.readouterr().out
    enc = Encoder.load(tmp_path / "m", device="cpu", precision="fp32")
    assert (enc.config.embed_dim, enc.config.depth, enc.config.num_heads, enc.config.img_size) == (384, 2, 12, 64)
    assert enc.meta["training"]["epoch"] == 300 and enc.meta["training"]["layout"] == "moco-v3"
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(reference(x), dim=-1).numpy()
    np.testing.assert_allclose(enc.embed(x), expected, atol=1e-5)


def test_import_plain_timm_state_dict_drops_the_classifier(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32,
                              patch_size=8, depth=2).eval()
    save_file(model.state_dict(), tmp_path / "vit.safetensors")
    assert main(["model", "import-moco", str(tmp_path / "vit.safetensors"), "--out", str(tmp_path / "m")]) == 0
    enc = Encoder.load(tmp_path / "m", device="cpu", precision="fp32")
    assert enc.config.num_heads == 3 and enc.config.patch_size == 8
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model.forward_head(model.forward_features(x), pre_logits=True), dim=-1)
    np.testing.assert_allclose(enc.embed(x), expected.numpy(), atol=1e-5)


@pytest.mark.parametrize("name", ["backbone.safetensors", "backbone.pth"])
def test_export_timm_loads_strictly_into_plain_timm(tmp_path, capsys, small_model_dir, name):
    import timm
    from safetensors.torch import load_file

    out = tmp_path / name
    assert main(["model", "export-timm", str(small_model_dir), "--out", str(out)]) == 0
    state = load_file(out) if out.suffix == ".safetensors" else torch.load(out, weights_only=True)
    doc = json.loads((small_model_dir / "config.json").read_text())
    timm.create_model(doc["timm"]["model_name"], pretrained=False, **doc["timm"]["kwargs"]).load_state_dict(state, strict=True)
    assert main(["model", "export-timm", str(small_model_dir), "--out", str(out)]) == 1  # never overwrites


def test_a_malicious_pickle_is_refused(tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"state_dict": {"x": Payload()}}, tmp_path / "evil.pth.tar")
    assert main(["model", "import-moco", str(tmp_path / "evil.pth.tar"), "--out", str(tmp_path / "m")]) == 1
    captured = capsys.readouterr()
    assert "cannot read" in captured.err and "this must never run" not in captured.out
    assert not (tmp_path / "m").exists()
    # one line that says how to convert the file, and never advises unpickling it (torch's own advice)
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot read" in lines[0] and "safely" in lines[0] and "safetensors" in lines[0]
    assert "weights_only" not in captured.err and "trust the source" not in captured.err
    assert "\x1b" not in captured.err  # no terminal escapes from torch's message
