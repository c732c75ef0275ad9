"""Group the incoming photos into clusters (spherical k-means over the embeddings).

    python examples/cluster_photos.py
"""

from pathlib import Path

from filterkit import Encoder, cluster_vectors, embed_folder

HERE = Path(__file__).parent

encoder = Encoder.load()
folder = embed_folder(HERE / "incoming", encoder, progress=False)
clusters = cluster_vectors(folder.vectors, k=4)
for c in range(len(clusters.prototypes)):
    members = sorted(folder.paths[i].name for i in (clusters.assignment == c).nonzero()[0])
    print(f"cluster {c}: {', '.join(members)}")
