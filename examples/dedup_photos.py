"""Find near-duplicates (crops, resizes, recompressed copies) among the incoming photos.

    python examples/dedup_photos.py
"""

from pathlib import Path

from filterkit import Encoder, find_duplicates

HERE = Path(__file__).parent

encoder = Encoder.load()
result = find_duplicates(HERE / "incoming", encoder=encoder)  # threshold: calibrated on the folder itself
for group in result.groups:
    print(f"keep {group.keep.name}")
    for dup in group.duplicates:
        print(f"   duplicate {dup.path.name} (pair score {dup.score:.3f}{', identical bytes' if dup.exact else ''})")
print(f"{result.summary_line()}, {len(result.skipped)} skipped")
