"""The collection-adapted normaliser: what each kind computes, and that it is stored faithfully."""

import numpy as np
import pytest

from filterkit import FilterkitError
from filterkit.normalize import Normalizer


def _anisotropic(n=400, dim=16, seed=0):
    """Unit vectors that share one large common direction, as a small SSL encoder's do."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)) * np.linspace(0.2, 2.0, dim) + 10.0 * np.eye(dim)[0]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_centring_removes_the_common_direction_and_keeps_unit_rows():
    x = _anisotropic()
    raw = x @ x.T
    norm = Normalizer.fit(x, "center")
    y = norm(x)
    assert np.allclose(np.linalg.norm(y, axis=1), 1, atol=1e-5)
    assert raw[np.triu_indices(len(x), 1)].mean() > 0.75  # unrelated vectors look alike raw
    assert abs((y @ y.T)[np.triu_indices(len(x), 1)].mean()) < 0.05  # and not once centred
    assert np.allclose(norm.mean, x.mean(axis=0), atol=1e-6)
    assert norm.to_dict() == {"kind": "center", "fitted_on": 400}


def test_whitening_equalises_the_spread_of_every_direction():
    x = _anisotropic(n=2000)
    norm = Normalizer.fit(x, "whiten")
    z = (x - norm.mean) @ norm.transform  # before the final L2 normalisation
    cov = np.cov(z, rowvar=False)
    assert 0 <= norm.shrinkage < 0.2
    # Ledoit-Wolf shrinks the covariance towards the identity, so the whitened covariance is
    # close to, not exactly, the identity: its eigenvalues lie in a narrow band around 1.
    eig = np.linalg.eigvalsh(cov)
    assert eig.min() > 0.5 and eig.max() < 1.5
    raw_eig = np.linalg.eigvalsh(np.cov(x, rowvar=False))
    assert raw_eig.max() / raw_eig.min() > 20  # the input was far from isotropic


def test_auto_centres_only_large_enough_collections_and_none_changes_nothing():
    from filterkit.normalize import AUTO_CENTER_MIN

    x = _anisotropic(n=100, dim=16)
    assert Normalizer.fit(x[:AUTO_CENTER_MIN], "auto").kind == "center"
    assert Normalizer.fit(x[:AUTO_CENTER_MIN - 1], "auto").kind == "none"
    none = Normalizer.fit(x, "none")
    assert none.kind == "none" and np.array_equal(none(x), x)
    assert Normalizer.fit(x[:1], "center").kind == "none"  # one vector has no spread to remove
    with pytest.raises(FilterkitError, match="--normalize must be one of"):
        Normalizer.fit(x, "pca")


@pytest.mark.parametrize("kind", ["none", "center", "whiten"])
def test_a_saved_normaliser_loads_to_the_same_transform(tmp_path, kind):
    x = _anisotropic()
    norm = Normalizer.fit(x, kind)
    norm.save(tmp_path)
    loaded = Normalizer.load(tmp_path)
    assert loaded.to_dict() == norm.to_dict()
    assert np.array_equal(loaded(x[:5]), norm(x[:5]))
