"""The preset registry is the one table that architectures, recipes and help texts come from."""

import pytest

from filterkit import FilterkitError
from filterkit.modeldir import ModelConfig
from filterkit.presets import ARCHS, PRESETS, Preset, Recipe, default_preset, get_preset, preset_for_arch
from filterkit.train import TrainOptions


def test_every_preset_builds_a_config_from_its_arch():
    for name, preset in PRESETS.items():
        cfg = ModelConfig.from_preset(name)
        arch = ARCHS[preset.arch]
        assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.timm_name) == (arch.width, arch.depth, arch.heads,
                                                                            arch.timm_name)
        assert cfg.token_stride == preset.patch_size * arch.stem_stride


def test_pretrain_without_a_preset_picks_by_device():
    cpu, gpu = TrainOptions().resolved("cpu"), TrainOptions().resolved("cuda")
    assert cpu.preset == default_preset("cpu") == "vit-mini-conv-8-32"
    assert gpu.preset == default_preset("cuda") == "vit-tiny-4-32"
    # The CPU default is the measured CPU hour (benchmarks/README.md): 4 blocks, batch 128, lr 2.5e-4.
    assert (cpu.depth, cpu.batch_size, cpu.lr) == (4, 128, pytest.approx(2.5e-4))
    assert (gpu.batch_size, gpu.proj_hidden, gpu.depth) == (512, 4096, None)


def test_a_preset_without_a_recipe_for_the_device_is_an_error_not_another_presets_recipe():
    bare = Preset("vit-test-8-32", "vit-mini", 8, 32, cpu=Recipe(64, 1, 256, 2), gpu=None)
    assert bare.recipe("cpu").batch_size == 64
    with pytest.raises(FilterkitError, match="no GPU recipe"):
        bare.recipe("cuda")
    with pytest.raises(FilterkitError, match="unknown preset"):
        get_preset("vit-giant")
    with pytest.raises(FilterkitError, match="unknown preset"):
        TrainOptions(preset="vit-giant").resolved("cpu")


def test_imported_weights_train_with_a_recipe_of_their_arch():
    assert preset_for_arch("vit-small") == "vit-small-16-224"
    # Every arch that `model import-moco` can name has a recipe (ViT-B weights are the common case).
    for arch in ARCHS.values():
        if arch.imports_width:
            assert PRESETS[preset_for_arch(arch.name)].arch == arch.name
    with pytest.raises(FilterkitError, match="no preset uses the vit-giant"):
        preset_for_arch("vit-giant")
