import json
import socket

import pytest
import torch
from PIL import Image

from conftest import assert_no_machine_path
from filterkit import FilterkitError
from filterkit.cli import main
from filterkit.encoder import build_backbone
from filterkit.modeldir import CONFIG_FILE, WEIGHTS_FILE, ModelConfig
from filterkit.train import CHECKPOINT, TrainingStopped, TrainOptions, load_checkpoint, pretrain

TINY = dict(preset="vit-mini-8-32", depth=1, batch_size=8, proj_hidden=32, pred_hidden=32, out_dim=16,
            checkpoint_every=100)
TINY_CLI = ["--preset", "vit-mini-8-32", "--depth", "1", "--batch-size", "8", "--max-steps", "3",
            "--workers", "0", "-q"]


def params(state):
    return {k: v for k, v in state.items() if v.is_floating_point()}


def test_resume_continues_exactly(tmp_path, train_dir):
    opts = TrainOptions(max_steps=6, epochs=10, **TINY)
    straight = pretrain(train_dir, tmp_path / "a", opts, device="cpu", workers=0, progress=False)
    first = pretrain(train_dir, tmp_path / "b", opts, device="cpu", workers=0, progress=False, stop_at_step=3)
    assert first.steps == 3 and load_checkpoint(tmp_path / "b" / CHECKPOINT)["step"] == 3
    resumed = pretrain(train_dir, tmp_path / "b", TrainOptions(), resume=True, device="cpu", workers=1, progress=False)
    assert resumed.steps == 6
    a, b = params(straight.model.state_dict()), params(resumed.model.state_dict())
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    # and the training really moved the weights
    assert not torch.equal(a["base.backbone.blocks.0.attn.qkv.weight"],
                           first.model.state_dict()["base.backbone.blocks.0.attn.qkv.weight"])


def test_output_is_a_model_directory_that_loads_into_plain_timm(tmp_path, train_dir):
    import timm
    from safetensors.torch import load_file

    result = pretrain(train_dir, tmp_path / "m", TrainOptions(max_steps=2, epochs=10, **TINY),
                      device="cpu", workers=0, progress=False)
    doc = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())
    assert doc["training"]["method"] == "MoCo v3" and doc["training"]["steps"] == 2
    plain = timm.create_model(doc["timm"]["model_name"], pretrained=False, **doc["timm"]["kwargs"])
    state = load_file(tmp_path / "m" / WEIGHTS_FILE)
    plain.load_state_dict(state, strict=True)
    for key, value in result.model.base.backbone.state_dict().items():
        assert torch.equal(state[key], value)
    log = [json.loads(line) for line in (tmp_path / "m" / "training" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    assert {"loss", "lr", "momentum", "images_per_s", "feature_std"} <= set(log[0])


def test_freeze_patch_embed_keeps_the_random_projection(tmp_path, train_dir):
    result = pretrain(train_dir, tmp_path / "m", TrainOptions(max_steps=3, epochs=10, freeze_patch_embed=True, **TINY),
                      device="cpu", workers=0, progress=False)
    torch.manual_seed(0)
    initial = build_backbone(ModelConfig.from_preset("vit-mini-8-32", depth=1))
    trained = result.model.base.backbone
    assert torch.equal(trained.patch_embed.proj.weight, initial.patch_embed.proj.weight)
    assert not torch.equal(trained.blocks[0].mlp.fc1.weight, initial.blocks[0].mlp.fc1.weight)


def test_default_trains_the_patch_projection(tmp_path, train_dir):
    result = pretrain(train_dir, tmp_path / "m", TrainOptions(max_steps=3, epochs=10, **TINY),
                      device="cpu", workers=0, progress=False)
    torch.manual_seed(0)
    initial = build_backbone(ModelConfig.from_preset("vit-mini-8-32", depth=1))
    assert not torch.equal(result.model.base.backbone.patch_embed.proj.weight, initial.patch_embed.proj.weight)


def test_no_predictor_trains_without_one(tmp_path, train_dir):
    result = pretrain(train_dir, tmp_path / "m", TrainOptions(max_steps=2, epochs=10, predictor=False, **TINY),
                      device="cpu", workers=0, progress=False)
    assert isinstance(result.model.predictor, torch.nn.Identity)


def test_nan_loss_stops_the_run_with_a_message(tmp_path, train_dir, monkeypatch, capsys):
    import filterkit.moco as moco

    real = moco.contrastive_loss
    monkeypatch.setattr(moco, "contrastive_loss", lambda q, k, t, queue=None: real(q, k, t, queue) * float("nan"))
    with pytest.raises(TrainingStopped, match="loss became nan at step 0"):
        pretrain(train_dir, tmp_path / "m", TrainOptions(max_steps=3, epochs=10, **TINY),
                 device="cpu", workers=0, progress=False)
    code = main(["pretrain", str(train_dir), "--out", str(tmp_path / "cli"), "--preset", "vit-mini-8-32",
                 "--depth", "1", "--batch-size", "8", "--max-steps", "2", "--workers", "0", "-q"])
    assert code == 1 and "error: loss became nan" in capsys.readouterr().err


def test_collapsed_features_stop_the_run(tmp_path, train_dir, monkeypatch):
    import filterkit.moco as moco

    real = moco.MoCo.forward

    def collapsed(self, x1, x2):
        loss, features = real(self, x1, x2)
        return loss, torch.ones_like(features)  # every image at one point: std 0

    monkeypatch.setattr(moco.MoCo, "forward", collapsed)
    with pytest.raises(TrainingStopped, match="features collapsed at step 3"):
        pretrain(train_dir, tmp_path / "m", TrainOptions(max_steps=10, epochs=10, warmup_epochs=0, **TINY),
                 device="cpu", workers=0, progress=False, collapse_patience=3)


def test_ctrl_c_saves_a_checkpoint_to_resume_from(tmp_path, train_dir, monkeypatch):
    import filterkit.train.loop as train  # where the loop looks the schedule up

    real = train.momentum_at

    def interrupt_at_step_2(step, total, base):
        if step == 2:
            raise KeyboardInterrupt
        return real(step, total, base)

    monkeypatch.setattr(train, "momentum_at", interrupt_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        pretrain(train_dir, tmp_path / "m", TrainOptions(max_steps=5, epochs=10, **TINY),
                 device="cpu", workers=0, progress=False)
    assert load_checkpoint(tmp_path / "m" / CHECKPOINT)["step"] == 2
    monkeypatch.setattr(train, "momentum_at", real)
    log_path = tmp_path / "m" / "training" / "log.jsonl"
    with open(log_path, "a") as f:
        f.write('{"step": 3, "loss": 1.0}\n{"step": 4, "lo')  # logged after the checkpoint, then killed
    assert pretrain(train_dir, tmp_path / "m", TrainOptions(), resume=True, device="cpu", workers=0,
                    progress=False).steps == 5
    steps = [json.loads(line)["step"] for line in log_path.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_existing_output_and_mismatched_resume_are_clear_errors(tmp_path, train_dir):
    pretrain(train_dir, tmp_path / "m", TrainOptions(max_steps=1, epochs=10, **TINY), device="cpu",
             workers=0, progress=False)
    with pytest.raises(FilterkitError, match="already holds files"):
        pretrain(train_dir, tmp_path / "m", TrainOptions(max_steps=1, epochs=10, **TINY), device="cpu", workers=0,
                 progress=False)
    with pytest.raises(FilterkitError, match="differ from the checkpoint: batch_size"):
        pretrain(train_dir, tmp_path / "m", TrainOptions(batch_size=4), resume=True, device="cpu",
                 workers=0, progress=False)
    with pytest.raises(FilterkitError, match="nothing to resume"):
        pretrain(train_dir, tmp_path / "new", TrainOptions(), resume=True, device="cpu", workers=0, progress=False)


def test_a_folder_with_no_decodable_image_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "bad").mkdir()
    for i in range(3):
        (tmp_path / "bad" / f"{i}.jpg").write_bytes(b"not a jpeg")
    code = main(["pretrain", str(tmp_path / "bad"), "--out", str(tmp_path / "m"), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "none of the 3 images decodes" in err[0]


def test_a_folder_smaller_than_the_batch_scales_the_lr_to_the_real_batch(tmp_path, train_dir):
    opts = TrainOptions(max_steps=1, epochs=1, **dict(TINY, batch_size=64))
    pretrain(train_dir, tmp_path / "m", opts, device="cpu", workers=0, progress=False)
    saved = load_checkpoint(tmp_path / "m" / CHECKPOINT)["options"]
    assert saved["batch_size"] == 24 and saved["lr"] == pytest.approx(saved["base_lr"] * 24 / 256)
    # The same command with --resume continues (the batch asked for was clamped, not changed) ...
    assert pretrain(train_dir, tmp_path / "m", opts, resume=True, device="cpu", workers=0, progress=False).steps == 1
    assert load_checkpoint(tmp_path / "m" / CHECKPOINT)["options"]["batch_size"] == 24
    # ... while another batch size is still a conflict.
    with pytest.raises(FilterkitError, match="batch_size"):
        pretrain(train_dir, tmp_path / "m", TrainOptions(max_steps=1, epochs=1, **dict(TINY, batch_size=16)),
                 resume=True, device="cpu", workers=0, progress=False)


def test_a_batch_of_one_is_refused_before_any_work(tmp_path, train_dir):
    # The projector batch-normalises each process's share: one image per process cannot train.
    with pytest.raises(FilterkitError, match="--batch-size 1 is too small: pretraining needs at least 2"):
        pretrain(train_dir, tmp_path / "m", TrainOptions(max_steps=1, **dict(TINY, batch_size=1)), device="cpu",
                 workers=0, progress=False)
    assert not (tmp_path / "m").exists()


def test_a_json_log_inside_out_does_not_stop_the_export(tmp_path, train_dir):
    # the model directory is pretrain's own --out: a file of the run's there is no reason to refuse it
    result = pretrain(train_dir, tmp_path / "m", TrainOptions(max_steps=2, **TINY), device="cpu", workers=0,
                      progress=False, json_log=tmp_path / "m" / "steps.jsonl")
    assert result.steps == 2 and (tmp_path / "m" / CONFIG_FILE).is_file()
    assert len((tmp_path / "m" / "steps.jsonl").read_text().splitlines()) == 2


def test_checkpoints_refuse_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(FilterkitError, match="cannot load training checkpoint .* holds pickled objects") as e:
        load_checkpoint(tmp_path / "evil.pt")
    assert "weights_only" not in str(e.value) and "\n" not in str(e.value)  # no advice to unpickle it
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(FilterkitError, match="cannot load training checkpoint .*cut.pt: "):
        load_checkpoint(tmp_path / "cut.pt")


def test_two_process_gloo_ddp_keeps_ranks_identical_and_gathers_the_global_batch(tmp_path, train_dir):
    import torch.multiprocessing as mp

    import _ddp_worker

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_worker.run, args=(2, port, str(train_dir), str(tmp_path / "m"), str(tmp_path)),
                       nprocs=2, join=True, start_method="spawn")
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    # Parameters (both encoders, heads) are identical; BatchNorm running statistics are
    # per-rank on gloo (no SyncBatchNorm there) and are not weights.
    weights = [k for k in params(r0["state"]) if "running_" not in k]
    assert any("momentum.backbone" in k for k in weights) and any("predictor" in k for k in weights)
    for key in weights:
        torch.testing.assert_close(r0["state"][key], r1["state"][key], rtol=0, atol=0, msg=key)
    assert (r0["gathered_rows"], r0["offset"], r1["offset"]) == (8, 0, 4)
    from filterkit.moco import contrastive_loss

    single = contrastive_loss(r0["q_all"], r0["k_all"], 0.2)  # one process, the whole global batch
    torch.testing.assert_close(r0["mean_loss"], single, rtol=1e-5, atol=1e-6)
    assert (tmp_path / "m" / CONFIG_FILE).is_file()


def test_eval_cli_reports_the_model_and_both_baselines(tmp_path, capsys, small_model_dir):
    import numpy as np

    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 6)):
        for cls, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                noise = rng.integers(-40, 40, (64, 64, 3))
                Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    code = main(["eval", "--model", str(small_model_dir), "--train", str(tmp_path / "train"),
                 "--test", str(tmp_path / "test"), "--json", "-q", "--workers", "0"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert report["baselines"]["raw_pixels"]["knn_top1"] == 1.0  # colour alone separates them
    assert 0.0 <= report["baselines"]["random_init"]["knn_top1"] <= 1.0
    assert 0.0 <= report["knn_top1"] <= 1.0
    assert report["protocol"]["n_test"] == 12 and report["protocol"]["k"] == 20


def test_init_from_a_training_folder_or_a_model_directory(tmp_path, train_dir):
    import shutil

    first = pretrain(train_dir, tmp_path / "a", TrainOptions(max_steps=3, epochs=10, **TINY),
                     device="cpu", workers=0, progress=False)
    a = first.model.state_dict()
    # lr 0 keeps the base encoder where it started, so it must equal run "a"'s end state.
    frozen = TrainOptions(max_steps=2, epochs=10, lr=0.0, init_from=str(tmp_path / "a"), seed=5, **TINY)
    b = pretrain(train_dir, tmp_path / "b", frozen, device="cpu", workers=0, progress=False)
    for key in ("base.backbone.blocks.0.attn.qkv.weight", "base.projector.0.weight", "predictor.0.weight"):
        torch.testing.assert_close(b.model.state_dict()[key], a[key], rtol=0, atol=0, msg=key)
    doc = json.loads((tmp_path / "b" / CONFIG_FILE).read_text())
    assert doc["training"]["init"]["loaded"] == "encoders and heads"
    assert doc["training"]["init"]["model_id"] == json.loads((tmp_path / "a" / CONFIG_FILE).read_text())["model_id"]
    assert b.steps == 2  # a new schedule: its own step count, not a resume of "a"

    # A plain model directory (no training checkpoint) gives the backbone; the heads start fresh.
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        shutil.copy(tmp_path / "a" / name, plain / name)
    c = pretrain(train_dir, tmp_path / "c", TrainOptions(**{**frozen.__dict__, "init_from": str(plain)}),
                 device="cpu", workers=0, progress=False)
    c_state = c.model.state_dict()
    torch.testing.assert_close(c_state["base.backbone.blocks.0.attn.qkv.weight"],
                               a["base.backbone.blocks.0.attn.qkv.weight"], rtol=0, atol=0)
    assert not torch.equal(c_state["base.projector.0.weight"], a["base.projector.0.weight"])
    assert json.loads((tmp_path / "c" / CONFIG_FILE).read_text())["training"]["init"]["loaded"] == "backbone"

    with pytest.raises(FilterkitError, match="is a vit-mini-8-32 model: --preset vit-tiny-4-32 does not fit"):
        pretrain(train_dir, tmp_path / "d", TrainOptions(**{**TINY, "preset": "vit-tiny-4-32", "depth": None,
                                                            "init_from": str(plain)}),
                 device="cpu", workers=0, progress=False)
    with pytest.raises(FilterkitError, match="has 1 blocks: --depth 2 does not fit"):
        pretrain(train_dir, tmp_path / "d", TrainOptions(**{**TINY, "depth": 2, "init_from": str(plain)}),
                 device="cpu", workers=0, progress=False)
    with pytest.raises(FilterkitError, match="give one or the other"):
        pretrain(train_dir, tmp_path / "b", TrainOptions(init_from=str(plain)), resume=True, device="cpu",
                 workers=0, progress=False)

    # Nothing but --init-from: preset, depth (a --depth model) and head shapes come from the init.
    e = pretrain(train_dir, tmp_path / "e", TrainOptions(init_from=str(tmp_path / "a"), max_steps=1, batch_size=8),
                 device="cpu", workers=0, progress=False)
    doc = json.loads((tmp_path / "e" / CONFIG_FILE).read_text())
    assert doc["architecture"]["depth"] == 1 and doc["training"]["preset"] == "vit-mini-8-32"
    assert doc["training"]["depth"] == 1 and doc["training"]["proj_hidden"] == 32
    assert doc["training"]["init"]["loaded"] == "encoders and heads"
    assert e.steps == 1


def test_init_from_chain_is_recorded_in_config_json_without_paths(tmp_path, train_dir):
    import shutil

    opts = dict(epochs=10, **TINY)
    pretrain(train_dir, tmp_path / "a", TrainOptions(max_steps=3, **opts), device="cpu", workers=0, progress=False)
    pretrain(train_dir, tmp_path / "b", TrainOptions(max_steps=2, init_from=str(tmp_path / "a"), seed=1, **opts),
             device="cpu", workers=0, progress=False)
    pretrain(train_dir, tmp_path / "c", TrainOptions(max_steps=1, init_from=str(tmp_path / "b"), seed=2, **opts),
             device="cpu", workers=0, progress=False)
    docs = {name: json.loads((tmp_path / name / CONFIG_FILE).read_text()) for name in "abc"}
    c = docs["c"]
    assert_no_machine_path(c, tmp_path, train_dir)
    assert c["data"] == {"name": train_dir.name, "images": 24}
    t = c["training"]
    assert t["init_from"] == "b" and t["steps"] == 1 and t["seed"] == 2
    assert {k: t["init"][k] for k in ("name", "model_id", "steps", "total_steps", "images", "data")} == \
        {"name": "b", "model_id": docs["b"]["model_id"], "steps": 2, "total_steps": 2, "images": 24,
         "data": train_dir.name}
    # Every earlier run, oldest first, with its own training record and data.
    assert [s["name"] for s in t["stages"]] == ["a", "b"]
    assert [s["model_id"] for s in t["stages"]] == [docs["a"]["model_id"], docs["b"]["model_id"]]
    assert [s["training"]["steps"] for s in t["stages"]] == [3, 2]
    assert [s["training"]["seed"] for s in t["stages"]] == [0, 1]
    assert t["stages"][0]["training"]["init_from"] is None and "init" not in t["stages"][0]["training"]
    assert t["stages"][1]["training"]["init"]["name"] == "a"
    assert all(s["data"] == {"name": train_dir.name, "images": 24} for s in t["stages"])
    assert "stages" not in t["init"] and all("stages" not in s["training"] for s in t["stages"])

    # A model written by an older version recorded paths: they become names in the chain.
    old = tmp_path / "old-model"
    old.mkdir()
    shutil.copy(tmp_path / "b" / WEIGHTS_FILE, old / WEIGHTS_FILE)
    legacy = json.loads((tmp_path / "b" / CONFIG_FILE).read_text())
    legacy["data"] = {"folder": str(train_dir), "images": 24}
    legacy["training"]["init_from"] = str(tmp_path / "a")
    legacy["training"]["init"] = {"from": str(tmp_path / "a"), "model_id": docs["a"]["model_id"], "steps": 3}
    del legacy["training"]["stages"]
    (old / CONFIG_FILE).write_text(json.dumps(legacy))
    pretrain(train_dir, tmp_path / "d", TrainOptions(max_steps=1, init_from=str(old), **opts),
             device="cpu", workers=0, progress=False)
    d = json.loads((tmp_path / "d" / CONFIG_FILE).read_text())
    assert_no_machine_path(d, tmp_path, train_dir)
    (stage,) = d["training"]["stages"]
    assert stage["name"] == "old-model" and stage["data"] == {"name": train_dir.name, "images": 24}
    assert stage["training"]["init_from"] == "a" and stage["training"]["init"]["name"] == "a"
    assert d["training"]["init"]["loaded"] == "backbone"  # a plain model directory: no checkpoint


def test_cli_init_from_default_continues_the_shipped_model(tmp_path, train_dir, capsys):
    from filterkit.encoder import Encoder
    from filterkit.modeldir import default_model_path

    out = tmp_path / "adapted"
    common = ["--batch-size", "8", "--workers", "0", "--quiet"]
    code = main(["pretrain", str(train_dir), "--out", str(out), "--init-from", "default", "--max-steps", "3",
                 "--stop-at-step", "1", *common])
    assert code == 0 and "stopped at step 1" in capsys.readouterr().out
    assert load_checkpoint(out / CHECKPOINT)["step"] == 1
    # --resume continues the stopped run (the init is not loaded again) and keeps its provenance.
    assert main(["pretrain", str(train_dir), "--out", str(out), "--resume", *common]) == 0
    doc = json.loads((out / CONFIG_FILE).read_text())
    assert doc["training"]["steps"] == 3
    assert doc["architecture"]["preset"] == Encoder.load().config.preset
    assert doc["training"]["init"]["model_id"] == Encoder.load().model_id
    assert doc["training"]["init"]["loaded"] == "backbone"
    # The shipped model is recorded by name, with its own stages behind it (it has none: one run).
    assert doc["training"]["init_from"] == "default" and doc["training"]["init"]["name"] == "filterkit-vit-mini"
    shipped = json.loads((default_model_path() / CONFIG_FILE).read_text())["training"]
    assert [s["name"] for s in doc["training"]["stages"]] == [*[s["name"] for s in shipped.get("stages", [])],
                                                            "filterkit-vit-mini"]
    assert_no_machine_path(doc, tmp_path, train_dir)


def test_resume_treats_an_option_given_equal_to_its_default_like_any_other(tmp_path, train_dir, capsys):
    out = tmp_path / "m"
    first = dict(TINY, seed=1, freeze_patch_embed=True)
    pretrain(train_dir, out, TrainOptions(max_steps=2, epochs=10, **first), device="cpu", workers=0,
             progress=False, stop_at_step=1)
    # seed 0 and no frozen patch projection are the defaults, and differ from the checkpoint.
    with pytest.raises(FilterkitError, match=r"differ from the checkpoint: seed \(checkpoint 1, now 0\)"):
        pretrain(train_dir, out, TrainOptions(seed=0), resume=True, device="cpu", workers=0, progress=False)
    with pytest.raises(FilterkitError, match="differ from the checkpoint: freeze_patch_embed"):
        pretrain(train_dir, out, TrainOptions(freeze_patch_embed=False), resume=True, device="cpu", workers=0,
                 progress=False)
    common = ["pretrain", str(train_dir), "--out", str(out), "--resume", "--workers", "0", "-q"]
    assert main([*common, "--seed", "0"]) == 1
    assert "differ from the checkpoint: seed (checkpoint 1, now 0)" in capsys.readouterr().err
    # --checkpoint-every 500 (the default) is honoured; what is not given stays the checkpoint's.
    assert main([*common, "--checkpoint-every", "500"]) == 0
    saved = load_checkpoint(out / CHECKPOINT)
    assert saved["step"] == 2 and saved["options"]["checkpoint_every"] == 500
    assert saved["options"]["seed"] == 1 and saved["options"]["freeze_patch_embed"] is True


def test_init_from_keeps_head_widths_given_equal_to_the_defaults(tmp_path, train_dir):
    pretrain(train_dir, tmp_path / "a", TrainOptions(max_steps=1, epochs=10, **TINY), device="cpu", workers=0,
             progress=False)
    # out_dim 256 is the default; the init's heads have 16, so only the backbone can be loaded.
    b = pretrain(train_dir, tmp_path / "b", TrainOptions(**dict(TINY, out_dim=256), max_steps=1, epochs=10,
                                                         init_from=str(tmp_path / "a")),
                 device="cpu", workers=0, progress=False)
    assert b.model.base.projector[-2].out_features == 256
    assert json.loads((tmp_path / "b" / CONFIG_FILE).read_text())["training"]["init"]["loaded"] == "backbone"


def test_resume_refuses_a_folder_whose_image_count_changed(tmp_path, train_dir):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(train_dir, data)
    opts = TrainOptions(max_steps=2, epochs=10, **TINY)
    pretrain(data, tmp_path / "m", opts, device="cpu", workers=0, progress=False, stop_at_step=1)
    shutil.copy(data / "part0" / "0.png", data / "extra.png")
    with pytest.raises(FilterkitError, match="has 25 training images but the checkpoint was trained on 24"):
        pretrain(data, tmp_path / "m", TrainOptions(), resume=True, device="cpu", workers=0, progress=False)
    # A checkpoint from before the count was stored resumes as it always did.
    state = torch.load(tmp_path / "m" / CHECKPOINT, weights_only=True)
    del state["images"]
    torch.save(state, tmp_path / "m" / CHECKPOINT)
    assert pretrain(data, tmp_path / "m", TrainOptions(), resume=True, device="cpu", workers=0,
                    progress=False).steps == 2


def test_ctrl_c_before_training_starts_claims_no_checkpoint(tmp_path, train_dir, monkeypatch, capsys):
    import filterkit.train.data as train  # where discovery runs

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "discover_images", interrupt)
    code = main(["pretrain", str(train_dir), "--out", str(tmp_path / "m"), *TINY_CLI])
    err = capsys.readouterr().err
    assert code == 130 and err.strip() == "interrupted", err
    assert not (tmp_path / "m" / CHECKPOINT).exists()


def test_ctrl_c_in_the_loop_says_the_checkpoint_was_saved(tmp_path, train_dir, monkeypatch, capsys):
    import filterkit.train.loop as train  # where the loop looks the schedule up

    real = train.momentum_at

    def interrupt_at_step_1(step, total, base):
        if step == 1:
            raise KeyboardInterrupt
        return real(step, total, base)

    monkeypatch.setattr(train, "momentum_at", interrupt_at_step_1)
    code = main(["pretrain", str(train_dir), "--out", str(tmp_path / "m"), *TINY_CLI])
    err = capsys.readouterr().err
    assert code == 130 and err.count("interrupted") == 1, err
    assert "interrupted: checkpoint saved at step 1" in err and "--resume" in err
    assert load_checkpoint(tmp_path / "m" / CHECKPOINT)["step"] == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_outcomes(case, world, data, tmp_path, timeout=120):
    """Each rank's outcome of _ddp_worker.run_case; fails the test when the ranks hang."""
    import time

    import torch.multiprocessing as mp

    import _ddp_worker

    ctx = mp.start_processes(_ddp_worker.run_case,
                             args=(world, _free_port(), str(data), str(tmp_path / "m"), str(tmp_path), case),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for process in ctx.processes:
                process.kill()
            pytest.fail(f"{case}: the ranks still run after {timeout} s (a hang)")
    return [(tmp_path / f"rank{rank}.txt").read_text() for rank in range(world)]


def test_ddp_cli_reports_once_from_rank_0(tmp_path, train_dir):
    import torch.multiprocessing as mp

    import _ddp_worker

    mp.start_processes(_ddp_worker.run_cli, args=(2, _free_port(), str(train_dir), str(tmp_path / "m"), str(tmp_path)),
                       nprocs=2, join=True, start_method="spawn")
    rank0, rank1 = ((tmp_path / f"cli{r}.txt").read_text() for r in (0, 1))
    assert rank0.startswith("exit 0\n") and "trained 2 steps" in rank0 and f"model written to {tmp_path / 'm'}" in rank0
    assert rank1 == "exit 0\n"


def test_ddp_with_fewer_images_than_processes_is_a_clear_error(tmp_path, train_dir):
    data = tmp_path / "two"
    data.mkdir()
    for path in sorted(train_dir.rglob("*.png"))[:2]:
        (data / path.name).write_bytes(path.read_bytes())
    outcomes = _ddp_outcomes("few-images", 3, data, tmp_path)
    assert all(o.startswith("FilterkitError: ") and "2 images" in o and "3 processes" in o for o in outcomes), outcomes


def test_ddp_a_non_finite_loss_on_one_rank_stops_every_rank(tmp_path, train_dir):
    outcomes = _ddp_outcomes("nan-on-rank1", 2, train_dir, tmp_path)
    assert all(o.startswith("TrainingStopped: loss became nan at step 0") for o in outcomes), outcomes


def test_ddp_ranks_agree_on_collapse(tmp_path, train_dir):
    # Rank 1's half of the batch is one point, rank 0's is not: the ranks must take the same
    # decision (the global batch's features are not collapsed, so both go on).
    outcomes = _ddp_outcomes("collapse-on-rank1", 2, train_dir, tmp_path)
    assert outcomes == ["ok", "ok"], outcomes


def test_ddp_a_budget_run_stops_every_rank_on_rank_0s_clock(tmp_path, train_dir):
    outcomes = _ddp_outcomes("budget", 2, train_dir, tmp_path)
    assert outcomes[0] == outcomes[1] and outcomes[0].startswith("ok ") and outcomes[0].endswith(" minutes"), outcomes
    assert int(outcomes[0].split()[1]) >= 1


def test_ddp_a_budget_run_re_plans_every_rank_alike_on_rank_0s_clock(tmp_path, train_dir):
    # The plan is far too long and rank 1's clock says no time has passed: rank 0's re-plan must
    # reach both, or the ranks would step to different horizons and hang in a collective.
    outcomes = _ddp_outcomes("replan", 2, train_dir, tmp_path)
    assert outcomes[0] == outcomes[1] and outcomes[0].startswith("ok "), outcomes
    _, steps, total, _ = outcomes[0].split()
    assert 1 <= int(steps) <= int(total) < 100_000


def test_ddp_a_long_knn_monitor_on_rank_0_does_not_time_the_other_ranks_out(tmp_path, train_dir):
    outcomes = _ddp_outcomes("slow-monitor", 2, train_dir, tmp_path)
    assert outcomes == ["ok", "ok"], outcomes


def test_a_decode_worker_killed_mid_run_is_one_line_and_leaves_a_checkpoint_to_resume(tmp_path, train_dir,
                                                                                       monkeypatch):
    import os
    import signal

    import filterkit.train.data as data

    decoded, load_image = [], data.load_image

    def dies_on_its_twelfth_image(*args, **kwargs):  # in the decode worker, as the kernel's OOM killer would
        if torch.utils.data.get_worker_info() is not None:
            decoded.append(1)
            if len(decoded) == 12:
                os.kill(os.getpid(), signal.SIGKILL)
        return load_image(*args, **kwargs)

    monkeypatch.setattr(data, "load_image", dies_on_its_twelfth_image)
    with pytest.raises(FilterkitError, match="decode worker process died") as e:
        pretrain(train_dir, tmp_path / "m", TrainOptions(epochs=4, data_in_memory=False, **TINY), device="cpu",
                 workers=1, progress=False)
    step = load_checkpoint(tmp_path / "m" / CHECKPOINT)["step"]
    assert f"Checkpoint saved at step {step}; continue with --resume" in str(e.value) and "for memory" in str(e.value)


def test_sigterm_saves_a_checkpoint_like_ctrl_c_and_the_run_resumes(tmp_path, train_dir):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "m"
    cli = [sys.executable, "-m", "filterkit", "pretrain", str(train_dir), "--out", str(out), "--preset",
           "vit-mini-8-32", "--depth", "1", "--batch-size", "8", "--epochs", "10", "--workers", "0", "-q"]
    proc = subprocess.Popen([*cli, "--max-steps", "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    log = out / "training" / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (log.is_file() and log.read_text().count("\n") >= 2):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # what a scheduler or `kill` sends
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    step = load_checkpoint(out / CHECKPOINT)["step"]
    assert step >= 2 and f"checkpoint saved at step {step}" in err and "Traceback" not in err
    subprocess.run([*cli, "--max-steps", "100000", "--resume", "--stop-at-step", str(step + 1)], check=True,
                   capture_output=True)
    assert load_checkpoint(out / CHECKPOINT)["step"] == step + 1


def test_sigterm_to_the_whole_process_group_with_decode_workers_still_saves_a_checkpoint(tmp_path, train_dir):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "m"
    # its own process group, as a scheduler's job: the signal reaches the decode workers too
    proc = subprocess.Popen([sys.executable, "-m", "filterkit", "pretrain", str(train_dir), "--out", str(out),
                             "--preset", "vit-mini-8-32", "--depth", "1", "--batch-size", "8", "--epochs", "10",
                             "--workers", "2", "-q", "--max-steps", "100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    log = out / "training" / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (log.is_file() and log.read_text().count("\n") >= 2):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    step = load_checkpoint(out / CHECKPOINT)["step"]
    assert step >= 2 and f"checkpoint saved at step {step}" in err and "Traceback" not in err
