"""Networks: parameter counts (SPEC Appendix B), shapes, and equivalence of the rewritten ops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlwm_jax import config as config_lib
from dlwm_jax.networks import init_variables, make_networks, parameter_counts
from dlwm_jax.networks.distributions import (continuous_bernoulli_log_norm, continuous_bernoulli_log_prob,
                                             continuous_bernoulli_mean)
from dlwm_jax.networks.dynamics import initial_state
from dlwm_jax.networks.layers import BatchNorm, Upsample2x
from dlwm_jax.networks.vqvae import Codebook, ema_update, quantize


def test_parameter_counts_match_spec_stack4_column():
    counts = parameter_counts(config_lib.paper(), num_actions=18)
    assert counts == {"encoder": 2_016_256, "decoder": 2_080_228, "vqvae": 4_092_388, "dynamics": 6_552_547,
                      "policy": 1_303_571, "world_model": 10_644_935, "inference": 3_319_827}


def test_parameter_counts_follow_spec_formulas_for_other_stacks_and_actions():
    cfg = config_lib.override(config_lib.paper(), {"env.frame_stack": 1})
    for a in (3, 4, 6, 9):
        counts = parameter_counts(cfg, num_actions=a)
        assert counts["vqvae"] == 4_088_288 + 1_025 * 1
        assert counts["dynamics"] == 6_088_867 + 25_760 * a
        assert counts["policy"] == 1_294_337 + 513 * a


def test_output_shapes_and_batch_stats_are_not_params():
    cfg = config_lib.smoke()
    nets = make_networks(cfg, num_actions=5)
    variables = init_variables(nets, cfg, jax.random.key(0))
    b, c, d, k = 3, cfg.env.frame_stack, cfg.vqvae.code_dim, cfg.vqvae.num_codes
    obs = jax.random.randint(jax.random.key(1), (b, 96, 96, c), 0, 256).astype(jnp.uint8)

    @jax.jit
    def forward(variables, obs):
        z_e, updates = nets.encoder.apply(variables["encoder"], obs, train=True, mutable=["batch_stats"])
        logits = nets.decoder.apply(variables["decoder"], z_e)
        state = initial_state(b, cfg.dynamics.hidden_channels)
        dyn = nets.dynamics.apply(variables["dynamics"], z_e, jnp.arange(b), state)
        return z_e, updates, logits, dyn, nets.actor_critic.apply(variables["actor_critic"], z_e)

    z_e, updates, logits, (next_logits, reward_logits, new_state), (policy_logits, value) = forward(variables, obs)
    assert z_e.shape == (b, 6, 6, d)
    assert "batch_stats" in updates and "batch_stats" not in variables["encoder"]["params"]
    assert logits.shape == (b, 96, 96, c)
    assert next_logits.shape == (b, 6, 6, k) and reward_logits.shape == (b, 3)
    assert new_state.h2.shape == (b, 6, 6, cfg.dynamics.hidden_channels)
    assert policy_logits.shape == (b, 5) and value.shape == (b,)


def test_paper_sized_shapes():
    cfg = config_lib.paper()
    nets = make_networks(cfg, num_actions=18)
    variables = jax.eval_shape(lambda k: init_variables(nets, cfg, k), jax.random.key(0))
    obs = jax.ShapeDtypeStruct((2, 96, 96, 4), jnp.uint8)
    z_e = jax.eval_shape(lambda v, o: nets.encoder.apply(v, o, train=False), variables["encoder"], obs)
    assert z_e.shape == (2, 6, 6, 32)
    assert jax.eval_shape(nets.decoder.apply, variables["decoder"], z_e).shape == (2, 96, 96, 4)
    next_logits, reward_logits, _ = jax.eval_shape(nets.dynamics.apply, variables["dynamics"], z_e,
                                                   jnp.array([0, 17]), initial_state(2, 128))
    assert next_logits.shape == (2, 6, 6, 128) and reward_logits.shape == (2, 3)


@pytest.mark.parametrize("cin,cout,size", [(8, 5, 6), (3, 4, 12)])
def test_subpixel_upsample_equals_transposed_convolution(cin, cout, size):
    x = jax.random.normal(jax.random.key(0), (2, size, size, cin))
    sub, tr = Upsample2x(cout, "subpixel"), Upsample2x(cout, "transpose")
    params = sub.init(jax.random.key(1), x)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(tr.init(jax.random.key(1), x))
    y_sub, y_tr = sub.apply(params, x), tr.apply(params, x)
    assert y_sub.shape == (2, 2 * size, 2 * size, cout)
    np.testing.assert_allclose(y_sub, y_tr, atol=1e-5)
    # Gradients agree too.
    g_sub = jax.grad(lambda p: jnp.sum(jnp.sin(sub.apply(p, x))))(params)
    g_tr = jax.grad(lambda p: jnp.sum(jnp.sin(tr.apply(p, x))))(params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), g_sub, g_tr)


def test_transpose_mode_matches_a_direct_scatter_definition():
    """PyTorch ConvTranspose2d(k=4, s=2, p=1): out[2i-1+kh, 2j-1+kw] += x[i, j] W[kh, kw] (cropped)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 3, 3, 2)).astype(np.float32)
    layer = Upsample2x(3, "transpose")
    params = layer.init(jax.random.key(0), x)
    w, b = np.asarray(params["params"]["kernel"]), np.asarray(params["params"]["bias"])
    full = np.zeros((1, 8, 8, 3), np.float32)
    for i in range(3):
        for j in range(3):
            for kh in range(4):
                for kw in range(4):
                    full[0, 2 * i + kh, 2 * j + kw] += x[0, i, j] @ w[kh, kw]
    expected = full[:, 1:7, 1:7] + b
    np.testing.assert_allclose(layer.apply(params, x), expected, atol=1e-5)


def _numerical_log_norm(lam: float) -> float:
    """-log of the integral over x in [0,1] of lam^x (1-lam)^(1-x), by the trapezoidal rule in float64."""
    x = np.linspace(0.0, 1.0, 200_001)
    log_f = x * np.log(lam) + (1 - x) * np.log1p(-lam)
    m = log_f.max()
    return -(m + np.log(np.trapezoid(np.exp(log_f - m), x)))


@pytest.mark.parametrize("logit", [0.0, 1e-4, -1e-4, 1.0, -1.0, 5.0, -5.0, 50.0, -50.0])
def test_exact_log_normaliser_matches_numerical_integration(logit):
    lam = 1.0 / (1.0 + np.exp(-np.float64(logit)))
    lam = min(max(lam, 1e-300), 1 - 1e-16) if abs(logit) < 40 else lam
    if abs(logit) >= 40:  # 1 - lam underflows in float64 too; integrate in log space with log(1-lam) = -softplus(l)
        x = np.linspace(0.0, 1.0, 200_001)
        log_f = x * -np.logaddexp(0, -logit) + (1 - x) * -np.logaddexp(0, logit)
        m = log_f.max()
        expected = -(m + np.log(np.trapezoid(np.exp(log_f - m), x)))
    else:
        expected = _numerical_log_norm(lam)
    got = float(continuous_bernoulli_log_norm(jnp.float32(logit), exact=True))
    assert got == pytest.approx(expected, abs=2e-5, rel=1e-5)


@pytest.mark.parametrize("logit", [0.0, 1e-4, -1e-4, 1.0, -1.0, 5.0, -5.0, 50.0, -50.0])
def test_reference_log_normaliser_matches_integration_of_its_clipped_probability(logit):
    """The reference (torch) clamps p to [eps, 1-eps]; its log C is the exact normaliser of that clamped p."""
    eps = float(np.finfo(np.float32).eps)
    lam = float(np.clip(1.0 / (1.0 + np.exp(-np.float64(logit))), eps, 1 - eps))
    got = float(continuous_bernoulli_log_norm(jnp.float32(logit)))
    assert got == pytest.approx(_numerical_log_norm(lam), abs=1e-4)


def test_continuous_bernoulli_reference_vectors():
    # SPEC 3.6 table (torch values): logit, log C, log p(0), log p(0.3), log p(1), mean
    table = [(-20, 2.7689815, 2.7689815, -3.2310185, -17.231018, 0.0627258),
             (-5, 1.6229141, 1.6161988, 0.1161988, -3.3838012, 0.1932164),
             (-1, 0.7719368, 0.4586751, 0.1586751, -0.5413249, 0.4180233),
             (-0.004, 0.6931620, 0.0020128, 0.0008128, -0.0019872, 0.4962769),
             (0, 0.6931472, 0, 0, 0, 0.5),
             (0.003, 0.6931480, -0.0015004, -0.0006003, 0.0014997, 0.5002500),
             (0.5, 0.7136821, -0.2603949, -0.1103950, 0.2396051, 0.5414941),
             (3, 1.1982688, -1.8503186, -0.9503185, 1.1496814, 0.7190624),
             (20, 2.7689815, -17.231018, -11.231018, 2.7689815, 0.9372742)]
    for logit, log_c, lp0, lp3, lp1, mean in table:
        l = jnp.float32(logit)
        np.testing.assert_allclose(continuous_bernoulli_log_norm(l), log_c, atol=1e-4)
        for x, lp in ((0.0, lp0), (0.3, lp3), (1.0, lp1)):
            np.testing.assert_allclose(continuous_bernoulli_log_prob(jnp.float32(x), l), lp, atol=1e-4)
        # The mean cancels two ~1/(2p-1) terms just outside the Taylor region: loose there (images only).
        np.testing.assert_allclose(continuous_bernoulli_mean(l), mean, atol=1e-2 if abs(logit) < 0.01 else 1e-4)


@pytest.mark.parametrize("exact", [False, True])
def test_continuous_bernoulli_gradients_are_finite(exact):
    logits = jnp.array([-60.0, -20.0, -5.0, -1e-3, 0.0, 1e-5, 0.004, 0.5, 16.0, 60.0])
    x = jnp.linspace(0, 1, logits.size)
    g = jax.grad(lambda l: jnp.sum(continuous_bernoulli_log_prob(x, l, exact)))(logits)
    assert np.all(np.isfinite(g))


def test_batch_norm_tracks_unbiased_running_variance_like_pytorch():
    x = jax.random.normal(jax.random.key(0), (4, 2, 2, 3)) * 2 + 1
    bn = BatchNorm()
    variables = bn.init(jax.random.key(1), x, train=True)
    y, upd = bn.apply(variables, x, train=True, mutable=["batch_stats"])
    flat = np.asarray(x).reshape(-1, 3)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.1 * flat.mean(0), rtol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["var"], 0.9 + 0.1 * flat.var(0, ddof=1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 3),
                               (flat - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-5), atol=1e-5)


def test_ema_codebook_reproduces_reference_quirk_vector():
    """SPEC 3.5's small reproducible test, including the inflation quirk."""
    codebook = Codebook(jnp.array([[0.0, 0.0], [1.0, 1.0], [-1.0, 2.0]]), jnp.zeros((3, 2)), jnp.array(0, jnp.int32),
                        jnp.zeros((3, 2)), jnp.zeros((3,)))
    z_e = jnp.array([[0.1, -0.1], [0.9, 1.2], [1.1, 0.8], [0.2, 0.3]])
    idx, z_q = quantize(z_e, codebook.embeddings)
    np.testing.assert_array_equal(idx, [0, 1, 1, 0])
    np.testing.assert_allclose(0.25 * jnp.mean((z_q - z_e) ** 2), 0.0078125, rtol=1e-5)
    codebook = ema_update(codebook, z_e, idx, 0.99, 1e-5)
    np.testing.assert_allclose(codebook.embeddings, [[15.003762, 10.002508], [100.025085, 100.025085], [0, 0]], rtol=1e-5)
    idx, _ = quantize(z_e, codebook.embeddings)
    np.testing.assert_array_equal(idx, [2, 2, 2, 2])
    codebook = ema_update(codebook, z_e, idx, 0.99, 1e-5)
    np.testing.assert_allclose(codebook.embeddings, [[7.536714, 5.024477], [50.244759, 50.244759],
                                                     [28.898102, 27.641665]], rtol=1e-5)


def test_ema_codebook_debiased_switch_gives_cluster_means():
    codebook = Codebook(jnp.zeros((2, 2)), jnp.zeros((2, 2)), jnp.array(0, jnp.int32), jnp.zeros((2, 2)), jnp.zeros((2,)))
    z_e = jnp.array([[1.0, 2.0], [3.0, 4.0], [-1.0, -1.0]])
    idx = jnp.array([0, 0, 1])
    out = ema_update(codebook, z_e, idx, 0.99, 1e-5, debias_counts=True)
    np.testing.assert_allclose(out.embeddings, [[2.0, 3.0], [-1.0, -1.0]], rtol=1e-3)
