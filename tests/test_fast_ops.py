"""Fast formulations (ComputeConfig switches) equal the plain ones: outputs and gradients, float32 to 1e-5."""
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from dlwm_jax import config as config_lib
from dlwm_jax.networks import init_variables, make_networks
from dlwm_jax.networks.convlstm import ConvLSTMCell
from dlwm_jax.networks.dynamics import initial_state
from dlwm_jax.networks.layers import Conv, conv2d, gemm_conv, im2col_conv, paired_gemm_conv, rows_conv

TOL = dict(rtol=1e-5, atol=1e-5)


def _plain_conv(x, kernel, padding):
    pad = ((padding, padding), (padding, padding))
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize("conv", [im2col_conv, gemm_conv, rows_conv])
@pytest.mark.parametrize("size,kernel,padding,cin,cout", [(6, 5, 2, 7, 12), (6, 3, 1, 5, 4), (5, 3, 0, 3, 6), (4, 5, 2, 3, 5)])
def test_fast_conv_equals_xla_conv_with_gradients(conv, size, kernel, padding, cin, cout):
    if conv is rows_conv and kernel != 2 * padding + 1:
        with pytest.raises(ValueError, match="same"):
            rows_conv(jnp.zeros((1, size, size, cin)), jnp.zeros((kernel, kernel, cin, cout)), padding)
        return
    key_x, key_w, key_t = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(key_x, (3, size, size, cin))
    w = jax.random.normal(key_w, (kernel, kernel, cin, cout)) / np.sqrt(kernel * kernel * cin)
    y_fast, y_plain = conv(x, w, padding), _plain_conv(x, w, padding)
    assert y_fast.shape == y_plain.shape
    np.testing.assert_allclose(y_fast, y_plain, **TOL)
    target = jax.random.normal(key_t, y_plain.shape)
    loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w, padding)) * target)
    for g_fast, g_plain in zip(jax.grad(loss(conv), (0, 1))(x, w), jax.grad(loss(_plain_conv), (0, 1))(x, w)):
        np.testing.assert_allclose(g_fast, g_plain, **TOL)


@pytest.mark.parametrize("impl", ["im2col", "gemm"])
@pytest.mark.parametrize("size,kernel,padding,cin,cout", [(12, 4, 1, 3, 5), (8, 4, 1, 6, 4), (7, 3, 0, 2, 3)])
def test_strided_matmul_conv_equals_xla_conv_with_gradients(impl, size, kernel, padding, cin, cout):
    """Stride 2 (the encoder's 4x4 convolutions) folded to stride 1 (space_to_depth_conv); a size whose padded
    size is odd cannot fold."""
    key_x, key_w, key_t = jax.random.split(jax.random.key(10), 3)
    x = jax.random.normal(key_x, (3, size, size, cin))
    w = jax.random.normal(key_w, (kernel, kernel, cin, cout)) / np.sqrt(kernel * kernel * cin)
    if (size + 2 * padding) % 2 or kernel % 2:
        with pytest.raises(ValueError, match="divisible by 2"):
            conv2d(x, w, padding, impl, stride=2)
        return
    plain = lambda x, w: jax.lax.conv_general_dilated(x, w, (2, 2), ((padding, padding),) * 2,
                                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                      precision=jax.lax.Precision.HIGHEST)
    fast = lambda x, w: conv2d(x, w, padding, impl, stride=2)
    np.testing.assert_allclose(fast(x, w), plain(x, w), **TOL)
    target = jax.random.normal(key_t, plain(x, w).shape)
    loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)) * target)
    for g_fast, g_plain in zip(jax.grad(loss(fast), (0, 1))(x, w), jax.grad(loss(plain), (0, 1))(x, w)):
        np.testing.assert_allclose(g_fast, g_plain, **TOL)


@pytest.mark.parametrize("stride,bias", [(1, False), (2, True)])
def test_conv_has_nn_conv_parameters_names_and_init(stride, bias):
    import flax.linen as nn

    class Two(nn.Module):  # two auto-named convolutions of each kind
        make: object

        @nn.compact
        def __call__(self, x):
            return self.make()(self.make()(x))

    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 9))
    init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
    bias_init = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -1 / 12, 1 / 12)
    reference = Two(lambda: nn.Conv(9, (4, 4), (stride, stride), ((1, 1), (1, 1)), use_bias=bias, kernel_init=init,
                                    bias_init=bias_init)).init(jax.random.key(2), x)
    for impl in ("im2col", "gemm", "xla"):
        params = Two(lambda: Conv(9, 4, 1, stride, bias, impl=impl)).init(jax.random.key(2), x)
        assert jax.tree.structure(params) == jax.tree.structure(reference)
        assert sorted(params["params"]) == ["Conv_0", "Conv_1"]
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="unknown conv impl"):
        Conv(16, 5, 2, impl="fft").init(jax.random.key(2), x)


@pytest.mark.parametrize("impl", ["im2col", "gemm"])
def test_vqvae_matmul_convs_equal_xla_outputs_and_gradients(impl):
    """compute.vqvae_conv: the smoke-sized encoder (batch-norm statistics, strided convs) and decoder (sub-pixel
    upsampling) through a loss of both, against XLA's convolutions."""
    configs = {c: config_lib.override(config_lib.smoke(), {"compute.vqvae_conv": c}) for c in (impl, "xla")}
    nets = {c: make_networks(cfg, num_actions=4) for c, cfg in configs.items()}
    assert nets[impl].encoder.conv_impl == nets[impl].decoder.conv_impl == impl
    variables = init_variables(nets["xla"], configs["xla"], jax.random.key(11))
    obs = jax.random.randint(jax.random.key(12), (5, 96, 96, 4), 0, 256).astype(jnp.uint8)

    def loss(n, params):
        z_e, stats = n.encoder.apply({**variables["encoder"], "params": params["encoder"]}, obs, train=True,
                                     mutable=["batch_stats"])
        logits = n.decoder.apply({"params": params["decoder"]}, z_e)
        return jnp.mean(jnp.sin(logits)) + jnp.mean(z_e ** 2), (z_e, stats)

    params = {k: variables[k]["params"] for k in ("encoder", "decoder")}
    out = {c: jax.jit(jax.value_and_grad(lambda p, n=n: loss(n, p), has_aux=True))(params) for c, n in nets.items()}
    (value, aux), grads = out[impl]
    (value_xla, aux_xla), grads_xla = out["xla"]
    np.testing.assert_allclose(value, value_xla, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(aux), jax.tree.leaves(aux_xla)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads_xla))  # some leaves' gradients are ~0
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_xla)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


def _cell_inputs(hidden=16, cin=11, batch=3):
    keys = jax.random.split(jax.random.key(3), 3)
    inputs = jax.random.normal(keys[0], (batch, 6, 6, cin))
    h, c = (jax.random.normal(k, (batch, 6, 6, hidden)) for k in keys[1:])
    return inputs, (h, c)


@pytest.mark.parametrize("size,kernel,padding,cins,cout", [(6, 5, 2, (7, 16), 12), (5, 3, 1, (9, 4), 5),
                                                           (4, 3, 0, (3, 3), 4)])
def test_paired_gemm_conv_equals_two_gemm_convs_as_one_matmul(size, kernel, padding, cins, cout):
    """Outputs (stacked) and gradients equal to two gemm_convs (the same sums plus zeros, float32 to 1e-5), and
    half the matmuls: one for the forward, one each for the kernels' and the inputs' gradients (two gemm_convs:
    2 + 4)."""
    keys = jax.random.split(jax.random.key(13), 5)
    x, y = (jax.random.normal(k, (3, size, size, c)) for k, c in zip(keys, cins))
    wx, wy = (jax.random.normal(k, (kernel, kernel, c, cout)) / np.sqrt(kernel * kernel * c)
              for k, c in zip(keys[2:], cins))
    two = lambda x, y, wx, wy: jnp.stack([gemm_conv(x, wx, padding), gemm_conv(y, wy, padding)])
    one = lambda x, y, wx, wy: paired_gemm_conv(x, y, wx, wy, padding)
    assert one(x, y, wx, wy).shape == two(x, y, wx, wy).shape
    np.testing.assert_allclose(one(x, y, wx, wy), two(x, y, wx, wy), **TOL)
    target = jax.random.normal(keys[4], two(x, y, wx, wy).shape)
    grad = lambda f: jax.grad(lambda *args: jnp.sum(jnp.sin(f(*args)) * target), (0, 1, 2, 3))
    for a, b in zip(grad(one)(x, y, wx, wy), grad(two)(x, y, wx, wy)):
        np.testing.assert_allclose(a, b, **TOL)
    dots = lambda fn: jax.jit(fn).lower(x, y, wx, wy).as_text().count("dot_general")
    assert (dots(one), dots(two), dots(grad(one)), dots(grad(two))) == (1, 2, 3, 6)


@pytest.mark.parametrize("fast", ["im2col", "gemm"])
def test_convlstm_cell_fast_convs_equal_xla_outputs_and_gradients(fast):
    """"gemm": conv_x and conv_h as one batched matmul (paired_gemm_conv), each kernel under its name."""
    inputs, state = _cell_inputs()
    fast, plain = ConvLSTMCell(16, conv_impl=fast), ConvLSTMCell(16, conv_impl="xla")
    params = fast.init(jax.random.key(4), inputs, state)
    assert jax.tree.structure(params) == jax.tree.structure(plain.init(jax.random.key(4), inputs, state))
    # Non-trivial layer-norm affine parameters, so every parameter's gradient is exercised.
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(5), p.shape), params)
    out_fast, out_plain = fast.apply(params, inputs, state), plain.apply(params, inputs, state)
    for a, b in zip(out_fast, out_plain):
        np.testing.assert_allclose(a, b, **TOL)
    loss = lambda cell: lambda p, x, s: sum(jnp.sum(jnp.sin(o)) for o in cell.apply(p, x, s))
    g_fast = jax.grad(loss(fast), (0, 1, 2))(params, inputs, state)
    g_plain = jax.grad(loss(plain), (0, 1, 2))(params, inputs, state)
    for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_plain)):
        np.testing.assert_allclose(a, b, **TOL)


@pytest.mark.parametrize("fast", ["im2col", "gemm", "rows"])
def test_dynamics_unrolled_loss_gradient_same_for_fast_and_xla_convs(fast):
    """Three recurrent steps of the smoke-sized dynamics network under grad (BPTT through the fast convs)."""
    configs = {impl: config_lib.override(config_lib.smoke(), {"compute.lstm_conv": impl}) for impl in (fast, "xla")}
    nets = {impl: make_networks(cfg, num_actions=5) for impl, cfg in configs.items()}
    params = init_variables(nets["xla"], configs["xla"], jax.random.key(6))["dynamics"]
    d = configs["xla"].vqvae.code_dim
    latents = jax.random.normal(jax.random.key(7), (3, 4, 6, 6, d))
    actions = jnp.array([[0, 1, 2, 4]] * 3)

    def loss(dynamics, params):
        state, total = initial_state(4, configs["xla"].dynamics.hidden_channels), 0.0
        for t in range(3):
            logits, reward_logits, state = dynamics.apply(params, latents[t], actions[t], state)
            total += jnp.sum(jax.nn.log_softmax(logits)[..., 0]) + jnp.sum(reward_logits ** 2)
        return total

    values = {impl: jax.value_and_grad(lambda p, n=n: loss(n.dynamics, p))(params) for impl, n in nets.items()}
    np.testing.assert_allclose(values[fast][0], values["xla"][0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(values[fast][1]), jax.tree.leaves(values["xla"][1])):
        np.testing.assert_allclose(a, b, **TOL)


@pytest.mark.parametrize("impl", ["im2col", "gemm"])
def test_actor_critic_fast_convs_equal_xla_outputs_and_gradients(impl):
    from dlwm_jax.networks.actor_critic import ActorCritic
    z_q = jax.random.normal(jax.random.key(8), (5, 6, 6, 8))
    fast, plain = ActorCritic(4, 8, 16, conv_impl=impl), ActorCritic(4, 8, 16, conv_impl="xla")
    params = fast.init(jax.random.key(9), z_q)
    reference = plain.init(jax.random.key(9), z_q)
    assert jax.tree.structure(params) == jax.tree.structure(reference)
    assert sorted(params["params"]) == ["Conv_0", "Conv_1", "Dense_0", "LayerNorm_0", "LayerNorm_1", "actor", "critic"]
    for a, b in zip(fast.apply(params, z_q), plain.apply(params, z_q)):
        np.testing.assert_allclose(a, b, **TOL)
    loss = lambda net: lambda p: jnp.sum(jnp.tanh(net.apply(p, z_q)[0])) + jnp.sum(net.apply(p, z_q)[1] ** 2)
    for a, b in zip(jax.tree.leaves(jax.grad(loss(fast))(params)), jax.tree.leaves(jax.grad(loss(plain))(params))):
        np.testing.assert_allclose(a, b, **TOL)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fused_layer_norm_equals_flax_with_gradients(dtype):
    """compute.layer_norm=fused: Flax's parameters and values, gradients of input, scale and bias; a leading seed
    axis under vmap; the input's dtype for its gradient."""
    from dlwm_jax.networks.layers import spatial_layer_norm
    x = (jax.random.normal(jax.random.key(20), (2, 3, 6, 6, 20)) * 3 + 1).astype(dtype)
    flax_ln, fused = spatial_layer_norm(1e-5, dtype=dtype), spatial_layer_norm(1e-5, dtype=dtype, impl="fused")
    params = flax_ln.init(jax.random.key(21), x[0])
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, fused.init(jax.random.key(21), x[0]))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(fused.init(jax.random.key(21), x[0]))):
        np.testing.assert_array_equal(a, b)  # ones and zeros
    params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(22), p.shape), params)
    target = jax.random.normal(jax.random.key(23), x.shape)
    tol = TOL if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)  # bfloat16 output rounding
    outs, grads = {}, {}
    for name, ln in (("flax", flax_ln), ("fused", fused)):
        apply = jax.vmap(lambda p, x: ln.apply(p, x), (None, 0))
        outs[name] = apply(params, x)
        loss = lambda p, x: jnp.sum(jnp.sin(apply(p, x).astype(jnp.float32)) * target)
        grads[name] = jax.grad(loss, (0, 1))(params, x)
    assert outs["fused"].dtype == dtype and grads["fused"][1].dtype == dtype
    np.testing.assert_allclose(outs["fused"].astype(np.float32), outs["flax"].astype(np.float32), **tol)
    for a, b in zip(jax.tree.leaves(grads["fused"]), jax.tree.leaves(grads["flax"])):
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), **tol)


def test_fused_layer_norm_networks_equal_flax_ones():
    """The dynamics network through 3 recurrent steps (its cells normalise their two gate tensors as one,
    paired_layer_norm) and the actor-critic, layer norms fused against Flax's."""
    configs = {ln: config_lib.override(config_lib.smoke(), {"compute.layer_norm": ln}) for ln in ("fused", "flax")}
    nets = {ln: make_networks(cfg, num_actions=5) for ln, cfg in configs.items()}
    assert nets["fused"].dream_dynamics.layer_norm == nets["fused"].actor_critic.layer_norm == "fused"
    variables = init_variables(nets["flax"], configs["flax"], jax.random.key(24))
    assert jax.tree.structure(variables) == jax.tree.structure(init_variables(nets["fused"], configs["fused"],
                                                                             jax.random.key(24)))
    d = configs["flax"].vqvae.code_dim
    latents = jax.random.normal(jax.random.key(25), (3, 4, 6, 6, d))

    def loss(n, params):
        state, total = initial_state(4, configs["flax"].dynamics.hidden_channels), 0.0
        for t in range(3):
            logits, reward_logits, state = n.dynamics.apply(params["dynamics"], latents[t], jnp.arange(4), state)
            total += jnp.sum(jax.nn.log_softmax(logits)[..., 0]) + jnp.sum(reward_logits ** 2)
        policy_logits, value = n.actor_critic.apply(params["actor_critic"], latents[0])
        return total + jnp.sum(jnp.tanh(policy_logits)) + jnp.sum(value ** 2)

    params = {k: variables[k] for k in ("dynamics", "actor_critic")}
    values = {ln: jax.value_and_grad(lambda p, n=n: loss(n, p))(params) for ln, n in nets.items()}
    np.testing.assert_allclose(values["fused"][0], values["flax"][0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(values["fused"][1]), jax.tree.leaves(values["flax"][1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def _reductions_after_reductions(fn, *args) -> int:
    """How many reduce_sums of fn's jaxpr read a value computed from another reduce_sum's output."""
    jaxpr, after, count = jax.make_jaxpr(fn)(*args).jaxpr, set(), 0
    for eqn in jaxpr.eqns:
        depends = any(not isinstance(v, jax.extend.core.Literal) and v in after for v in eqn.invars)
        count += depends and eqn.primitive.name == "reduce_sum"
        if depends or eqn.primitive.name == "reduce_sum":
            after.update(eqn.outvars)
    return count


def test_one_pass_batch_norm_equals_two_pass_with_gradients():
    """compute.batch_norm=one_pass: the smoke encoder in train mode (z_e, running statistics, gradients of a loss
    of z_e) equals the two-pass one, on frames and on activations offset far from zero (the clip keeps the
    variance >= 0); and its batch norm's two reductions read x only (the two-pass variance reads the mean)."""
    from dlwm_jax.networks.layers import BatchNorm
    configs = {v: config_lib.override(config_lib.smoke(), {"compute.batch_norm": v}) for v in ("one_pass", "two_pass")}
    nets = {v: make_networks(cfg, num_actions=4) for v, cfg in configs.items()}
    variables = init_variables(nets["two_pass"], configs["two_pass"], jax.random.key(26))["encoder"]
    obs = jax.random.randint(jax.random.key(27), (6, 96, 96, 4), 0, 256).astype(jnp.uint8)
    target = jax.random.normal(jax.random.key(28), (6, 6, 6, configs["two_pass"].vqvae.code_dim))

    def loss(n, params):
        z_e, stats = n.encoder.apply({**variables, "params": params}, obs, train=True, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(z_e) * target), (z_e, stats)
    out = {v: jax.jit(jax.value_and_grad(lambda p, n=n: loss(n, p), has_aux=True))(variables["params"])
           for v, n in nets.items()}
    (value, aux), grads = out["one_pass"]
    (value_ref, aux_ref), grads_ref = out["two_pass"]
    np.testing.assert_allclose(value, value_ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(jax.tree.leaves((aux, grads)), jax.tree.leaves((aux_ref, grads_ref))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * max(1.0, float(jnp.max(jnp.abs(b)))))

    x = jax.random.normal(jax.random.key(29), (5, 4, 4, 7)) * 0.5 + 20.0  # |mean| = 40 std
    bns = {v: BatchNorm(variance=v) for v in ("one_pass", "two_pass")}
    bn_vars = bns["two_pass"].init(jax.random.key(30), x, True)
    apply = {v: (lambda x, bn=bn: bn.apply(bn_vars, x, True, mutable=["batch_stats"])) for v, bn in bns.items()}
    for a, b in zip(jax.tree.leaves(apply["one_pass"](x)), jax.tree.leaves(apply["two_pass"](x))):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3)
    assert _reductions_after_reductions(apply["one_pass"], x) == 0
    assert _reductions_after_reductions(apply["two_pass"], x) == 1
    with pytest.raises(ValueError, match="unknown batch norm variance 'welford'"):
        BatchNorm(variance="welford").init(jax.random.key(30), x, True)


@pytest.mark.parametrize("field", ["lstm_conv", "dream_lstm_conv", "policy_conv", "vqvae_conv", "layer_norm",
                                   "batch_norm"])
def test_config_rejects_unknown_conv_impl(field):
    with pytest.raises(ValueError, match=field):
        config_lib.override(config_lib.smoke(), {f"compute.{field}": "winograd"})


YNNPACK_CHOICES = ("all", "reduce", "none")


def test_config_rejects_unknown_ynnpack_choice():
    with pytest.raises(ValueError, match="vqvae_ynnpack"):
        config_lib.override(config_lib.smoke(), {"compute.vqvae_ynnpack": "true"})


def test_ynnpack_choices_become_xla_cpu_options():
    options = {c: config_lib.override(config_lib.smoke(), {"compute.ppo_ynnpack": c}).compute.compiler_options("ppo_update")
               for c in YNNPACK_CHOICES}
    assert options["all"] == {}
    if jax.default_backend() == "cpu":
        assert options["none"] == {"xla_cpu_experimental_ynn_fusion_type": ""}
        assert options["reduce"] == {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


def test_vqvae_step_same_for_every_ynnpack_choice():
    """ComputeConfig.vqvae_ynnpack only picks XLA:CPU's kernels: the step's results agree to float rounding."""
    from dlwm_jax import world_model as wm
    from dlwm_jax.replay import ObservationBatch
    configs = {c: config_lib.override(config_lib.smoke(), {"compute.vqvae_ynnpack": c}) for c in YNNPACK_CHOICES}
    observations = jax.random.randint(jax.random.key(13), (6, 96, 96, 4), 0, 256).astype(jnp.uint8)
    batch = ObservationBatch(observations, jnp.ones(6, bool))
    state = wm.init_world_model(configs["all"], 4, jax.random.key(14))
    params = {"encoder": state.encoder_params, "decoder": state.decoder_params}
    results = {}
    for choice, cfg in configs.items():  # the loss gradient, compiled as the step compiles it
        grad_fn = jax.jit(jax.grad(wm.vqvae_loss, has_aux=True),
                          compiler_options=cfg.compute.compiler_options("vqvae_step"))
        grads, (metrics, z_e, _, batch_stats) = grad_fn(params, state.replace(config=cfg), batch)
        results[choice] = (grads, metrics["loss"], z_e, batch_stats)
    for choice in ("reduce", "none"):
        for a, b in zip(jax.tree.leaves(results[choice]), jax.tree.leaves(results["all"])):
            # summed over 6 x 96 x 96 x 4 pixels through batch norm: float32 accumulation order shows at 1e-4
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * float(jnp.max(jnp.abs(b))))
    # and the step itself runs under the options
    step = jax.jit(wm.vqvae_step, compiler_options=configs["reduce"].compute.compiler_options("vqvae_step"))
    new_state, metrics = step(state.replace(config=configs["reduce"]), batch)
    np.testing.assert_allclose(metrics["loss"], results["reduce"][1], rtol=1e-5)


def test_ppo_loss_gradient_same_for_every_ynnpack_choice():
    """ComputeConfig.ppo_ynnpack only picks XLA:CPU's kernels for the PPO update program."""
    from dlwm_jax import ppo
    from dlwm_jax.networks.actor_critic import ActorCritic
    net = ActorCritic(5, 16, 32)
    keys = jax.random.split(jax.random.key(15), 4)
    z_q = jax.random.normal(keys[0], (40, 6, 6, 8))
    params = net.init(keys[1], z_q)
    batch = ppo.Minibatch(z_q, jax.random.randint(keys[2], (40,), 0, 5), jnp.full((40,), -1.6), jnp.zeros(40),
                          jax.random.normal(keys[3], (40,)), jax.random.normal(keys[3], (40,)) * 2)
    results = {}
    for choice in YNNPACK_CHOICES:
        cfg = config_lib.override(config_lib.smoke(), {"compute.ppo_ynnpack": choice})
        grad_fn = jax.jit(jax.grad(lambda p: ppo.ppo_loss(p, net.apply, batch, jnp.ones(40, bool), cfg)[0]),
                          compiler_options=cfg.compute.compiler_options("ppo_update"))
        results[choice] = grad_fn(params)
    for choice in ("reduce", "none"):
        for a, b in zip(jax.tree.leaves(results[choice]), jax.tree.leaves(results["all"])):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))))


def test_dream_dynamics_is_the_dynamics_network_with_its_own_conv_impl():
    config = config_lib.override(config_lib.smoke(), {"compute.dream_lstm_conv": "rows"})
    nets = make_networks(config, num_actions=5)
    assert nets.dream_dynamics.conv_impl == "rows"
    assert nets.dynamics.conv_impl == config_lib.resolve_compute(config).compute.lstm_conv == "im2col"  # CPU choice
    assert nets.dream_dynamics.clone(conv_impl=nets.dynamics.conv_impl) == nets.dynamics


def test_gemm_conv_gradient_has_no_scatter_the_im2col_one_has():
    """gemm_conv's gradient is matmuls and slices only: nothing whose float sums a GPU may order differently run to
    run (XLA's scatter-add on a GPU accumulates with atomics); im2col_conv's (the CPU's choice) is a scatter-add."""
    x, w = jnp.ones((2, 6, 6, 3)), jnp.ones((5, 5, 3, 4))
    hlo = lambda conv: jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w, 2) ** 2), (0, 1))).lower(x, w).as_text()
    assert "scatter" not in hlo(gemm_conv) and "dot_general" in hlo(gemm_conv)
    assert "scatter" in hlo(im2col_conv)
