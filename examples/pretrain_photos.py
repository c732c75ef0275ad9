"""Pretrain a (deliberately tiny) ViT with MoCo v3 on the example photos, then use it.

    python examples/pretrain_photos.py [OUT_DIR]

Real runs train on thousands of images for many epochs (see scripts/train_default_model.sh);
this one takes a few seconds on a laptop and only shows the API.
"""

import sys
import tempfile
from pathlib import Path

from filterkit import Encoder, TrainOptions, pretrain

HERE = Path(__file__).parent

out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()) / "tiny-model"
options = TrainOptions(preset="vit-mini-8-32", depth=2, batch_size=8, epochs=2, proj_hidden=128,
                       pred_hidden=128, out_dim=64)
result = pretrain(HERE / "incoming", out, options, progress=False)
print(f"{result.steps} steps, final loss {result.final_loss:.3f}, model in {out}")
encoder = Encoder.load(out)
print("embedding of exemplars/cat.jpg:", encoder.embed([HERE / "exemplars" / "cat.jpg"]).shape)
