"""The Python API mirrors the commands: results are dataclasses that serialise themselves."""

import json

import numpy as np
import pytest

import filterkit
from filterkit import FilterkitError, cluster_folder, find_duplicates, search_folder
from filterkit.dedup import DedupResult


def _unit(rows):
    v = np.asarray(rows, dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_find_duplicates_on_vectors_groups_row_indices():
    v = _unit([[1, 0, 0], [0, 1, 0], [0.999, 0.04, 0], [0, 0, 1], [0.02, 0.9995, 0]])
    result = find_duplicates(v, threshold=0.99)
    assert isinstance(result, DedupResult)
    assert [(g.keep, [d.path for d in g.duplicates]) for g in result.groups] == [(0, [2]), (1, [4])]
    assert result.groups[0].duplicates[0].score == pytest.approx(float(v[0] @ v[2]))
    doc = json.loads(json.dumps(result.to_dict()))
    assert doc["groups"][1] == {"keep": 1, "duplicates": [{"path": 4, "score": round(float(v[1] @ v[4]), 6),
                                                           "exact": False}],
                                "weakest_link": {"a": 1, "b": 4, "score": round(float(v[1] @ v[4]), 6)}}
    assert not doc["verified"] and "cosine only, not verified" in result.summary_line()
    assert doc["threshold"] == 0.99 and doc["skipped"] == []
    assert result.n_duplicates == 2 and "2 group(s), 2 duplicate(s)" in result.summary_line()
    assert find_duplicates(v, threshold=0.9999).groups == []


def test_find_duplicates_on_vectors_needs_a_number_without_an_encoder():
    with pytest.raises(FilterkitError, match="encoder"):
        find_duplicates(_unit([[1, 0], [0, 1]]))
    with pytest.raises(FilterkitError, match=r"\[N, D\]"):
        find_duplicates(np.ones(4, np.float32), threshold=0.9)
    with pytest.raises(FilterkitError, match="needs encoder"):
        find_duplicates("some/folder", threshold=0.9)


def test_find_duplicates_on_a_folder_returns_the_same_kind_of_result(tmp_path, photos_dir, small_encoder):
    import shutil

    root = tmp_path / "photos"
    shutil.copytree(photos_dir, root)
    shutil.copy(root / "coffee.jpg", root / "renamed_coffee.jpg")
    (root / "broken.jpg").write_bytes(b"not an image")
    result = find_duplicates(root, encoder=small_encoder, threshold=0.999, workers=0)
    pairs = {(g.keep.name, tuple(d.path.name for d in g.duplicates)) for g in result.groups}
    assert ("coffee.jpg", ("renamed_coffee.jpg",)) in pairs or ("renamed_coffee.jpg", ("coffee.jpg",)) in pairs
    assert [s.path.name for s in result.skipped] == ["broken.jpg"]
    doc = result.to_dict()
    assert doc["skipped"][0]["path"].endswith("broken.jpg") and doc["skipped"][0]["reason"]


def test_search_folder_ranks_the_query_itself_first(photos_dir, small_encoder):
    query = photos_dir / "rocket.jpg"
    result = search_folder([query], photos_dir, small_encoder, k=3, workers=0)
    hits = result.queries[0].hits
    assert hits[0].path == query and hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    doc = result.queries[0].to_dict()
    assert doc["query"] == str(query) and doc["results"][0] == {"path": str(query), "score": round(hits[0].score, 6)}
    with pytest.raises(FilterkitError, match="query image not found"):
        search_folder([photos_dir / "missing.jpg"], photos_dir, small_encoder)


def test_cluster_folder_assigns_every_image_and_selects_a_fraction(photos_dir, small_encoder):
    result = cluster_folder(photos_dir, small_encoder, k=2, keep_fraction=0.5, keep="hard", workers=0)
    doc = result.to_dict()
    assert len(doc["images"]) == 8 and sum(c["size"] for c in doc["clusters"]) == 8
    assert sum(row["selected"] for row in doc["images"]) == 4
    selected = [row["distance"] for row in doc["images"] if row["selected"]]
    pruned = [row["distance"] for row in doc["images"] if not row["selected"]]
    assert min(selected) >= max(pruned)  # "hard": the farthest from their prototype
    assert {c for _, c in result.categories()} == {"selected", "pruned"}
    with pytest.raises(FilterkitError, match="more than the 8 images"):
        cluster_folder(photos_dir, small_encoder, k=9, workers=0)


def test_lazy_exports_are_listed_by_dir_and_resolve():
    names = dir(filterkit)
    for name in ("Encoder", "find_duplicates", "search_folder", "cluster_folder", "DedupResult", "ImageFilter"):
        assert name in names and name in filterkit.__all__
        assert getattr(filterkit, name) is not None
    with pytest.raises(AttributeError):
        filterkit.no_such_name  # noqa: B018


@pytest.mark.parametrize("workflow", ["dedup", "search"])
def test_without_a_cache_argument_the_default_cache_keeps_the_folder_index(workflow, photos_dir, small_encoder,
                                                                          private_cache, monkeypatch):
    import filterkit.index

    monkeypatch.setattr(filterkit.index, "EXACT_MAX", 2)  # an IVF index (exact ones are not kept) for 8 photos
    if workflow == "dedup":
        find_duplicates(photos_dir, encoder=small_encoder, threshold=0.99)
    else:
        search_folder([sorted(photos_dir.iterdir())[0]], photos_dir, small_encoder, k=2)
    kept = list(private_cache.with_name(private_cache.name + ".indexes").glob("*.ivf.faiss"))
    assert len(kept) == 1


def test_cluster_and_search_record_the_space_they_measured_in(photos_dir, small_encoder):
    raw = cluster_folder(photos_dir, small_encoder, k=2, workers=0)
    centred = cluster_folder(photos_dir, small_encoder, k=2, workers=0, normalize="center")
    assert raw.to_dict()["normalize"] == {"kind": "none", "fitted_on": 8}
    assert centred.to_dict()["normalize"] == {"kind": "center", "fitted_on": 8}
    # Centred, prototype distances spread over more of [0, 2] than raw cosines crowded near 1.
    assert centred.clustering.distance.mean() > raw.clustering.distance.mean()
    found = search_folder([sorted(photos_dir.iterdir())[0]], photos_dir, small_encoder, k=2, normalize="auto")
    assert found.to_dict()["normalize"]["kind"] == "none"  # auto leaves 8 vectors raw (AUTO_CENTER_MIN)
    with pytest.raises(FilterkitError, match="--normalize must be one of"):
        cluster_folder(photos_dir, small_encoder, k=2, normalize="zca")


def test_find_duplicates_on_vectors_refuses_rows_that_are_not_unit():
    v = _unit([[1, 0, 0], [0, 1, 0]])
    v[1] *= 3
    with pytest.raises(FilterkitError, match="row 1 has norm 3"):
        find_duplicates(v, threshold=0.9)


def test_linked_chains_are_split_so_every_duplicate_is_like_its_keeper():
    # Six directions 18 degrees apart: each links its neighbour (cos 0.951), but the first and
    # the sixth are orthogonal; one group of all six would call them copies of one photo.
    angles = np.radians(np.arange(6) * 18.0)
    v = np.stack([np.cos(angles), np.sin(angles), np.zeros(6)], axis=1).astype(np.float32)
    result = find_duplicates(v, threshold=0.95)
    assert [(g.keep, [d.path for d in g.duplicates]) for g in result.groups] == [(0, [1]), (2, [3]), (4, [5])]
    assert all(d.score >= 0.95 for g in result.groups for d in g.duplicates)
    assert all(g.weakest.score == min(d.score for d in g.duplicates) for g in result.groups)


def test_the_results_the_readme_says_have_to_dict_have_it():
    # README, Python API: "these results have to_dict(); embed_folder's summary()"
    from filterkit.cluster import FolderClusters
    from filterkit.compare import Comparison

    for cls in (filterkit.FilterResult, filterkit.DedupResult, filterkit.Neighbours, FolderClusters,
                filterkit.CrossDedupResult, filterkit.OutlierResult, Comparison):
        assert callable(getattr(cls, "to_dict", None)), cls
    assert callable(filterkit.EmbeddedFolder.summary)
