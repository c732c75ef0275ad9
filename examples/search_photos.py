"""Nearest neighbours of a query photo among the incoming photos, through a FAISS index.

    python examples/search_photos.py
"""

from pathlib import Path

from filterkit import Encoder, build_index, embed_folder, search

HERE = Path(__file__).parent

encoder = Encoder.load()
folder = embed_folder(HERE / "incoming", encoder, progress=False)  # cached: a second run is instant
index = build_index(folder.vectors)
query = encoder.embed([HERE / "exemplars" / "cat.jpg"])
found = search(index, query, k=3)
for rank, (i, score) in enumerate(zip(found.ids[0], found.scores[0]), 1):
    print(f"{rank}. {folder.paths[i].name:<24} cosine {score:.3f}")
