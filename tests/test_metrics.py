import numpy as np
import pytest
from scipy.spatial import distance

from station.core import metrics

TOL = 1e-9


@pytest.fixture
def data():
    rng = np.random.default_rng(42)
    ref = rng.normal(1.0, 0.3, 128)
    parts = ref + rng.normal(0.0, 0.2, (50, 128))
    # A partial anomaly: a handful of dimensions far off, the rest normal.
    partial = ref + rng.normal(0.0, 0.2, 128)
    partial[:6] += 4.0
    return np.vstack([parts, partial]), ref


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (lambda x, r: metrics.minkowski(x, r, p=4), lambda u, v: distance.minkowski(u, v, p=4)),
        (lambda x, r: metrics.minkowski(x, r, p=3), lambda u, v: distance.minkowski(u, v, p=3)),
        (metrics.cosine, distance.cosine),
    ],
)
def test_distances_match_scipy_row_by_row(data, ours, theirs):
    x, ref = data
    expected = np.array([theirs(row, ref) for row in x])
    np.testing.assert_allclose(ours(x, ref), expected, rtol=0, atol=TOL)
    # one part in, one number out
    assert np.ndim(ours(x[0], ref)) == 0
    assert ours(x[0], ref) == pytest.approx(expected[0], abs=TOL)


def test_minkowski_p4_ranks_a_partial_anomaly_above_equal_energy_diffuse_noise():
    ref = np.zeros(100)
    partial = np.zeros(100)
    partial[:4] = 1.0  # energy 4 in four dimensions
    diffuse = np.full(100, 0.2)  # energy 4 spread over all
    assert np.linalg.norm(partial - ref) == pytest.approx(np.linalg.norm(diffuse - ref))  # equal energy
    assert metrics.minkowski(partial, ref, p=4) > 2 * metrics.minkowski(diffuse, ref, p=4)


def soart3_by_the_formula(y, r):
    beta = (r @ y + 1e-4) / (r @ r + 1e-4)
    e = y - beta * r
    eta = np.log(1 + np.sum(np.abs(e)))
    gamma = eta - np.log(1 + np.sum(np.abs(e) ** 4) ** 0.25)
    log_beta = np.log(beta) if beta > 0 else np.nan
    return np.array([log_beta, eta, gamma])


def test_soart3_matches_the_formula(data):
    x, ref = data
    expected = np.array([soart3_by_the_formula(row, ref) for row in x])
    got = metrics.soart3(x, ref)
    assert got.shape == (len(x), 3)
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOL)
    single = metrics.soart3(x[-1], ref)
    assert single.shape == (3,)
    np.testing.assert_allclose(single, expected[-1], rtol=0, atol=TOL)


def test_soart3_gamma_is_lower_for_a_partial_residual_than_for_a_diffuse_one():
    ref = np.ones(64)
    diffuse = ref.copy()
    diffuse[::2] += 0.5
    diffuse[1::2] -= 0.5  # residual orthogonal to ref, spread over every dimension
    partial = ref.copy()
    partial[:4] += np.array([8.0, -8.0, 8.0, -8.0])  # same L1 mass in 4 dimensions
    d_diffuse, d_partial = metrics.soart3(np.vstack([diffuse, partial]), ref)
    assert d_diffuse[1] == pytest.approx(d_partial[1])  # eta: same L1 norm
    assert d_partial[2] < d_diffuse[2] - 1.0  # gamma separates them


def test_soart3_log_beta_is_nan_where_beta_is_not_positive_and_never_raises():
    ref = np.array([1.0, 2.0, 3.0])
    x = np.array([-ref, np.zeros(3), ref * 2])
    with np.errstate(all="raise"):  # any warning would become an exception
        features = metrics.soart3(x, ref)
    assert np.isnan(features[0, 0])  # beta < 0
    assert np.isfinite(features[1, 0])  # beta = 1e-4 / (14 + 1e-4) > 0
    assert features[2, 0] == pytest.approx(np.log(2.0), abs=1e-4)
    zero_ref = metrics.soart3(np.array([1.0, -1.0, 0.0]), np.zeros(3))  # beta = 1: degenerate but finite
    assert np.all(np.isfinite(zero_ref))


def test_mahalanobis_matches_scipy(data):
    x, _ = data
    train = np.random.default_rng(1).normal(size=(200, 8)) @ np.diag(np.arange(1, 9))
    mean = train.mean(axis=0)
    covariance, _ = metrics.oas_covariance(train)
    precision = metrics.precision_from_covariance(covariance)
    parts = x[:, :8]
    expected = np.array([distance.mahalanobis(row, mean, precision) for row in parts])
    np.testing.assert_allclose(metrics.mahalanobis(parts, mean, precision), expected, rtol=0, atol=TOL)
    assert metrics.mahalanobis(parts[0], mean, precision) == pytest.approx(expected[0], abs=TOL)


def test_oas_matches_sklearn_and_stays_invertible_when_n_is_below_d():
    sklearn_covariance = pytest.importorskip("sklearn.covariance")
    rng = np.random.default_rng(5)
    for n in (30, 300):
        samples = rng.normal(size=(n, 128)) * np.linspace(0.5, 2.0, 128)
        ours, shrinkage = metrics.oas_covariance(samples)
        reference = sklearn_covariance.OAS(assume_centered=False).fit(samples)
        np.testing.assert_allclose(ours, reference.covariance_, rtol=0, atol=TOL)
        assert shrinkage == pytest.approx(reference.shrinkage_, abs=TOL)
        assert np.all(np.linalg.eigvalsh(ours) > 0)  # n=30 < d=128: still positive definite


def test_oas_refuses_a_single_sample():
    with pytest.raises(ValueError, match="at least 2"):
        metrics.oas_covariance(np.ones((1, 4)))
