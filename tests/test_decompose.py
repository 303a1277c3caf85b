"""Properties of the Σ-norm decompositions on planted and random tensors."""

import pytest
import torch

from datd.decompose import cp, khatri_rao, spectrum, svd, tucker2
from datd.decompose._linalg import prepare_sigma, relative_error

D64 = torch.float64


def realistic_sigma(dim: int, seed: int, singular: int = 0) -> torch.Tensor:
    """Second moment of correlated, non-negative (post-ReLU-like) samples; ``singular`` dead inputs."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=gen, dtype=D64) / dim**0.5
    x = torch.relu(torch.randn(4 * dim, dim, generator=gen, dtype=D64) @ mix + 0.3)
    if singular:
        x[:, :singular] = 0
    return x.T @ x / x.shape[0]


def planted_tucker(shape, ranks, seed):
    gen = torch.Generator().manual_seed(seed)
    t, s, kh, kw = shape
    u_t = torch.randn(t, ranks[0], generator=gen, dtype=D64)
    u_s = torch.randn(s, ranks[1], generator=gen, dtype=D64)
    core = torch.randn(ranks[0], ranks[1], kh, kw, generator=gen, dtype=D64)
    return torch.einsum("ta,abij,sb->tsij", u_t, core, u_s)


def planted_cp(shape, rank, seed):
    gen = torch.Generator().manual_seed(seed)
    factors = [torch.randn(n, rank, generator=gen, dtype=D64) for n in shape]
    return (factors[0] @ khatri_rao(*factors[1:]).T).reshape(shape)


SIGMAS = {"frobenius": lambda d: None, "sigma": lambda d: realistic_sigma(d, 1), "singular": lambda d: realistic_sigma(d, 2, 5)}


@pytest.mark.parametrize("norm", SIGMAS)
def test_svd_recovers_planted_low_rank(norm):
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(24, 7, generator=gen, dtype=D64) @ torch.randn(7, 16 * 9, generator=gen, dtype=D64)).reshape(24, 16, 3, 3)
    result = svd(w, SIGMAS[norm](16 * 9), 7)
    assert result.error < 1e-8
    assert torch.allclose(result.reconstruct(), w, atol=1e-8 * w.abs().max())


@pytest.mark.parametrize("norm", SIGMAS)
def test_tucker2_recovers_planted_tensor(norm):
    w = planted_tucker((20, 16, 3, 3), (6, 5), seed=3)
    result = tucker2(w, SIGMAS[norm](16 * 9), (6, 5), init="random", seed=4, max_iter=500, tol=0)
    assert result.error < 1e-8
    assert torch.linalg.norm(result.reconstruct() - w) / torch.linalg.norm(w) < 1e-8


# with a non-square kernel the two spatial steps differ (the singular Σ converges too slowly there for 500 sweeps)
@pytest.mark.parametrize("norm, kernel", [(n, (3, 3)) for n in SIGMAS] + [(n, (3, 2)) for n in ("frobenius", "sigma")])
def test_cp_recovers_planted_tensor(norm, kernel):
    w = planted_cp((20, 16) + kernel, 6, seed=5)
    result = cp(w, SIGMAS[norm](16 * kernel[0] * kernel[1]), 6, max_iter=500, tol=1e-14)
    assert result.error < 1e-8
    assert torch.linalg.norm(result.reconstruct() - w) / torch.linalg.norm(w) < 1e-8


@pytest.mark.parametrize("norm", ["frobenius", "sigma", "singular"])
@pytest.mark.parametrize("fit", ["tucker2", "cp"])
def test_sigma_error_never_increases(fit, norm):
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(32, 24, 3, 3, generator=gen)
    sigma = SIGMAS[norm](24 * 9)
    result = tucker2(w, sigma, (12, 10), tol=0) if fit == "tucker2" else cp(w, sigma, 20, max_iter=40, tol=0)
    h = torch.tensor(result.history, dtype=D64)
    assert len(h) > 10
    assert (h[1:] <= h[:-1] * (1 + 1e-12)).all(), h
    assert h[-1] < h[0]
    # the history (expanded through the ALS steps' products) is the true relative Σ-error of the returned factors,
    # at the start, after a few sweeps and at the end
    s = prepare_sigma(sigma, 24 * 9, 1e-6)
    for sweeps in (0, 3, None):
        fitted = result if sweeps is None else (tucker2(w, sigma, (12, 10), max_iter=sweeps, tol=0) if fit == "tucker2"
                                                else cp(w, sigma, 20, max_iter=sweeps, tol=0))
        true = relative_error(w.double().reshape(32, -1), fitted.reconstruct().reshape(32, -1), s)
        assert true == pytest.approx(fitted.history[-1], rel=1e-9)
        assert sweeps is None or fitted.history == result.history[:sweeps + 1]


@pytest.mark.parametrize("norm", ["sigma", "singular"])
@pytest.mark.parametrize("t", [40, 150])  # T < D = 108, and an expanding layer (T > D: solved in D dimensions)
def test_svd_is_the_closed_form_optimum(norm, t):
    gen = torch.Generator().manual_seed(8)
    w = torch.randn(t, 12, 3, 3, generator=gen, dtype=D64)
    sigma = SIGMAS[norm](12 * 9)
    s = prepare_sigma(sigma, 12 * 9, 1e-6)
    w1 = w.reshape(t, -1)
    eig = torch.linalg.eigvalsh(w1 @ s @ w1.T).flip(0)
    assert spectrum(w, sigma).shape == (t,)
    assert torch.allclose(spectrum(w, sigma), eig.clamp_min(0), rtol=1e-10, atol=1e-12 * eig[0])
    for rank in (r for r in (1, 5, 17, 39, 107) if r <= min(t, 108)):
        result = svd(w, sigma, rank)
        assert result.error**2 == pytest.approx(float(eig[rank:].sum() / eig.sum()), rel=1e-8)
        assert torch.allclose(result.out_factor.T @ result.out_factor, torch.eye(rank, dtype=D64), atol=1e-10)
        # no other rank-r fit does better: perturbing the optimum only increases the error
        approx = result.reconstruct().reshape(t, -1)
        noise = 1e-3 * torch.randn(t, rank, generator=gen, dtype=D64) @ torch.randn(rank, 108, generator=gen, dtype=D64)
        u, sv, vh = torch.linalg.svd(approx + noise, full_matrices=False)
        other = (u[:, :rank] * sv[:rank]) @ vh[:rank]
        assert relative_error(w1, other, s) > result.error


def test_svd_without_sigma_is_truncated_svd():
    gen = torch.Generator().manual_seed(9)
    w = torch.randn(30, 20, generator=gen, dtype=D64)
    u, sv, vh = torch.linalg.svd(w, full_matrices=False)
    for rank in (1, 8, 19):
        expected = (u[:, :rank] * sv[:rank]) @ vh[:rank]
        result = svd(w, None, rank)
        assert result.reconstruct().shape == (30, 20)
        assert torch.allclose(result.reconstruct(), expected, atol=1e-12)
        assert result.error == pytest.approx(float(sv[rank:].norm() / sv.norm()), rel=1e-10)


@pytest.mark.parametrize("fit", ["svd", "tucker2", "cp"])
def test_identity_sigma_reproduces_the_frobenius_algorithm(fit):
    gen = torch.Generator().manual_seed(10)
    w = torch.randn(16, 12, 3, 3, generator=gen)
    run = {
        "svd": lambda s: svd(w, s, 6),
        "tucker2": lambda s: tucker2(w, s, (6, 5), max_iter=10),
        "cp": lambda s: cp(w, s, 10, max_iter=10),
    }[fit]
    plain, identity = run(None), run(3.0 * torch.eye(12 * 9))
    assert torch.allclose(torch.tensor(plain.history, dtype=D64), torch.tensor(identity.history, dtype=D64), rtol=1e-6)
    assert torch.allclose(plain.reconstruct(), identity.reconstruct(), atol=1e-6 * w.abs().max())


@pytest.mark.parametrize("fit", ["svd", "tucker2", "cp"])
def test_sigma_fit_beats_frobenius_fit_in_sigma_norm(fit):
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(24, 16, 3, 3, generator=gen)
    sigma = realistic_sigma(16 * 9, 12)
    s = prepare_sigma(sigma, 16 * 9, 1e-6)
    run = {"svd": lambda s_: svd(w, s_, 8), "tucker2": lambda s_: tucker2(w, s_, (8, 8)), "cp": lambda s_: cp(w, s_, 16)}[fit]
    w1 = w.double().reshape(24, -1)
    aware = relative_error(w1, run(sigma).reconstruct().reshape(24, -1), s)
    plain = relative_error(w1, run(None).reconstruct().reshape(24, -1), s)
    assert aware < 0.95 * plain


def test_fits_are_deterministic_for_a_seed():
    gen = torch.Generator().manual_seed(13)
    w = torch.randn(16, 12, 3, 3, generator=gen)
    sigma = realistic_sigma(12 * 9, 14)
    a, b = cp(w, sigma, 9, init="random", seed=1), cp(w, sigma, 9, init="random", seed=1)
    assert a.history == b.history and torch.equal(a.reconstruct(), b.reconstruct())
    assert cp(w, sigma, 9, init="random", seed=2).history != a.history
    assert tucker2(w, sigma, (5, 5)).history == tucker2(w, sigma, (5, 5)).history


def test_cp_line_search_reaches_the_plain_fit_in_half_the_sweeps():
    gen = torch.Generator().manual_seed(8)
    w = torch.randn(32, 24, 3, 3, generator=gen)
    sigma = realistic_sigma(24 * 9, 8)
    searched = cp(w, sigma, 20, max_iter=25, tol=0).history
    plain = cp(w, sigma, 20, max_iter=50, tol=0, extrapolate=False).history
    assert len(searched) == 26 and len(plain) == 51
    assert searched[-1] < 0.995 * plain[25] and searched[-1] < plain[50]


# (a matrix in the Frobenius norm is solved by the closed-form start: nothing to continue)
@pytest.mark.parametrize("norm, shape", [("frobenius", (24, 16, 3, 2)), ("sigma", (24, 16, 3, 2)), ("sigma", (24, 30))])
@pytest.mark.parametrize("fit", ["tucker2", "cp"])
def test_a_continued_fit_is_the_longer_fit(fit, shape, norm):
    """A fit continued from a shorter one (a planning fit: fewer sweeps, looser tol) is bit for bit the fit run
    from scratch with the longer settings."""
    gen = torch.Generator().manual_seed(17)
    w = torch.randn(*shape, generator=gen)
    sigma = SIGMAS[norm](w[0].numel())
    run = (lambda **kw: tucker2(w, sigma, (9, 7), **kw)) if fit == "tucker2" else (lambda **kw: cp(w, sigma, 12, **kw))
    short = run(max_iter=4, tol=1e-3)
    fresh, continued = run(max_iter=25, tol=1e-6), run(max_iter=25, tol=1e-6, start=short)
    assert len(short.history) <= 5 and len(fresh.history) > len(short.history) + 3
    assert continued.history == fresh.history
    assert all(torch.equal(x, y) for x, y in zip(fresh.factors().values(), continued.factors().values()))
    with pytest.raises(ValueError, match="cannot continue"):
        run(start=cp(w, sigma, 3, max_iter=1) if fit == "cp" else tucker2(w, sigma, (2, 2), max_iter=1))


def test_matrix_weights():
    gen = torch.Generator().manual_seed(15)
    w = torch.randn(20, 30, generator=gen)
    sigma = realistic_sigma(30, 16)
    for result in (svd(w, sigma, 5), tucker2(w, sigma, (5, 6)), cp(w, sigma, 5)):
        assert result.reconstruct().shape == (20, 30)
        assert 0 < result.error < 1


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda w: svd(w, None, 0), "rank"),
        (lambda w: svd(w, None, 17), "rank"),
        (lambda w: tucker2(w, None, (9, 2)), "ranks"),
        (lambda w: cp(w, None, 0), "rank"),
        (lambda w: svd(w, torch.eye(5), 2), "sigma must be"),
        (lambda w: svd(w, torch.full((72, 72), float("nan")), 2), "NaN"),
        (lambda w: svd(w, torch.zeros(72, 72), 2), "non-positive trace"),
        (lambda w: tucker2(w, None, (2, 2), init="bogus"), "init"),
        (lambda w: svd(w[0, 0, 0], None, 1), "weight must be"),
        (lambda w: svd(w * float("inf"), None, 1), "NaN or Inf"),
    ],
)
def test_bad_input_is_refused_clearly(call, message):
    w = torch.randn(8, 8, 3, 3)
    with pytest.raises(ValueError, match=message):
        call(w)


def test_cholesky_jittered_is_plain_cholesky_where_that_works_and_rescues_round_off():
    from datd.decompose._linalg import cholesky_jittered

    torch.manual_seed(7)
    a = torch.randn(40, 40, dtype=torch.float64)
    spd = a @ a.T + torch.eye(40, dtype=torch.float64)
    assert torch.equal(cholesky_jittered(spd), torch.linalg.cholesky(spd))  # bit for bit
    # rank 5 in 40 dimensions, scaled so that round-off makes it indefinite (the Tucker-2 core step's Qᵀ Σ Q on
    # DenseNet-121 with 8 calibration images failed this way)
    b = torch.randn(40, 5, dtype=torch.float64) * 1e3
    singular = b @ b.T
    assert int(torch.linalg.cholesky_ex(singular).info) != 0
    chol = cholesky_jittered(singular)
    assert torch.allclose(chol @ chol.T, singular, rtol=0, atol=1e-6 * float(singular.diagonal().mean()))
    with pytest.raises(torch.linalg.LinAlgError):
        cholesky_jittered(torch.full((3, 3), float("nan"), dtype=torch.float64))
