"""Keep the incoming photos that look like the exemplars, from Python, with the default model.

    python examples/filter_photos.py

With the shipped encoder the two astronaut photos are kept too (nearest exemplar cat.jpg):
the automatic threshold from two exemplars is their mutual similarity, and the encoder puts
the astronaut nearer both of them than they are to each other (README.md, Quickstart).
"""

from pathlib import Path

from filterkit import Encoder, ImageFilter

HERE = Path(__file__).parent

encoder = Encoder.load()  # the encoder filterkit ships; Encoder.load("models/x") for another
result = (ImageFilter(encoder)
          .keep_like(HERE / "exemplars")
          .reject_like(HERE / "negatives")
          .run(HERE / "incoming"))
print(f"threshold {result.threshold.value:.3f} ({result.threshold.source})")
for d in result.decisions:
    print(f"{d.decision:>6}  {d.path.name:<24} {d.reason}")
print(result.counts())
