import numpy as np
import torch

from qwt_deploy.calibration.cwac import ChannelStats, fit_affine


def _stats(y_q, y_fp, chunks=4):
    s = ChannelStats(channel_dim=1)
    for a, b in zip(torch.chunk(y_q, chunks), torch.chunk(y_fp, chunks)):
        s.update(a, b)
    return s


def test_closed_form_matches_numpy_lstsq_per_channel():
    rng = np.random.default_rng(0)
    n, c = 4000, 6
    y_q = rng.normal(3.0, 2.0, (n, c)).astype(np.float32)  # a large mean tests the shifted accumulation
    y_fp = (y_q * rng.uniform(-1.5, 1.5, c) + rng.normal(0, 1, c) + rng.normal(0, 0.3, (n, c))).astype(np.float32)
    fit = fit_affine(_stats(torch.from_numpy(y_q), torch.from_numpy(y_fp)), ridge=0.0)
    for ch in range(c):
        A = np.stack([y_q[:, ch].astype(np.float64), np.ones(n)], 1)
        (a, b), *_ = np.linalg.lstsq(A, y_fp[:, ch].astype(np.float64), rcond=None)
        assert abs(fit.alpha[ch] - a) < 1e-5 * max(1, abs(a))
        assert abs(fit.beta[ch] - b) < 1e-4 * max(1, abs(b))
    assert fit.mse_after < fit.mse_before


def test_streaming_over_nchw_batches_equals_one_pass():
    g = torch.Generator().manual_seed(1)
    y_q = torch.randn(8, 5, 7, 7, generator=g)
    y_fp = 0.8 * y_q + 0.1 + 0.05 * torch.randn(8, 5, 7, 7, generator=g)
    one, many = fit_affine(_stats(y_q, y_fp, 1), 1e-3), fit_affine(_stats(y_q, y_fp, 8), 1e-3)
    np.testing.assert_allclose(one.alpha, many.alpha, rtol=1e-5)
    np.testing.assert_allclose(one.beta, many.beta, atol=1e-5)


def test_ridge_sends_constant_channel_to_alpha_one():
    g = torch.Generator().manual_seed(2)
    y_q = torch.randn(1000, 3, generator=g)
    y_q[:, 1] = 0.25  # zero variance
    y_fp = y_q * 2.0
    y_fp[:, 1] = 0.75
    fit = fit_affine(_stats(y_q, y_fp), ridge=1e-3)
    assert abs(fit.alpha[1] - 1.0) < 1e-6
    assert abs(fit.beta[1] - 0.5) < 1e-5  # the mean shift is still corrected
    assert abs(fit.alpha[0] - 2.0) < 1e-2


def test_ridge_equals_augmented_lstsq_toward_one():
    """alpha = argmin sum (yf - a yq - b)^2 + n*lam*(a-1)^2, i.e. lstsq with one extra row."""
    rng = np.random.default_rng(3)
    n = 500
    yq = rng.normal(0, 1, n)
    yf = 1.7 * yq + 0.2 + rng.normal(0, 0.5, n)
    ridge = 0.3
    fit = fit_affine(_stats(torch.tensor(yq[:, None], dtype=torch.float32), torch.tensor(yf[:, None], dtype=torch.float32)), ridge)
    lam = ridge * yq.astype(np.float32).var()
    # centered problem: a = (cov + lam) / (var + lam)
    A = np.concatenate([np.stack([yq - yq.mean()], 1), [[np.sqrt(n * lam)]]])
    y = np.concatenate([yf - yf.mean() - (yq - yq.mean()), [0.0]])  # regress residual on yq for (a - 1)
    (d,), *_ = np.linalg.lstsq(A, y, rcond=None)
    assert abs(fit.alpha[0] - (1 + d)) < 1e-4


def test_bias_correction_fixes_alpha_at_one():
    y_q = torch.randn(100, 4)
    fit = fit_affine(_stats(y_q, 3 * y_q + 1), ridge=1e-3, fix_alpha=True)
    assert np.all(fit.alpha == 1.0)
    np.testing.assert_allclose(fit.beta, (2 * y_q + 1).mean(0).numpy(), atol=1e-4)
