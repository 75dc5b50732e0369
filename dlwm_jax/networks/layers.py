"""Building blocks shared by the networks: PyTorch-default initialisation (SPEC 12.3), an exact
PyTorch-style batch norm (SPEC 3.1/12.1), layer norm over (H, W, C), and the 2x upsampling layer.

Mixed precision (ComputeConfig.dtype): every layer takes `dtype`, the dtype its matmuls/convolutions and its
output are computed in; parameters are always created in float32 and cast at use, so gradients, optimizer
state and checkpoints stay float32. Normalisation statistics are computed in float32 whatever `dtype` is.
With the default float32 every cast is a no-op (the programs are unchanged)."""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def leaky_relu(x: jax.Array) -> jax.Array:
    return jax.nn.leaky_relu(x, 0.01)  # PyTorch's default slope


def uniform_init(bound: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def _patch_index(out_height: int, out_width: int, kernel: tuple[int, int], padded_width: int) -> np.ndarray:
    """Gather index [H'*W'*kh*kw] into a flattened padded grid of width `padded_width`: for each output
    position (y, x), its taps (y + i, x + j) in row-major (i, j) order (stride 1)."""
    y, x, i, j = np.meshgrid(np.arange(out_height), np.arange(out_width), np.arange(kernel[0]), np.arange(kernel[1]),
                             indexing="ij")
    return ((y + i) * padded_width + (x + j)).reshape(-1).astype(np.int32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _patches(padded: jax.Array, kernel: tuple[int, int], out_size: tuple[int, int]) -> jax.Array:
    """Patches [B, H', W', kh*kw*C] of a padded input [B, Hp, Wp, C] (stride 1), from kh*kw static slices."""
    out_h, out_w = out_size
    return jnp.concatenate([padded[:, i:i + out_h, j:j + out_w] for i in range(kernel[0]) for j in range(kernel[1])],
                           -1)


def _patches_fwd(padded, kernel, out_size):
    return _patches(padded, kernel, out_size), padded.shape


def _patches_bwd(kernel, out_size, shape, cotangent):
    # The transpose as one scatter-add over a constant index: in XLA:CPU's unrolled dynamics gradient this is
    # much faster than the pads that autodiff of the slices would produce.
    b, hp, wp, c = shape
    index = _patch_index(*out_size, kernel, wp)
    # Up to k*k taps land on one input cell: accumulate them in float32 (a no-op for float32 cotangents).
    grad = jnp.zeros((b, hp * wp, c), jnp.float32).at[:, index].add(cotangent.reshape(b, -1, c).astype(jnp.float32))
    return (grad.reshape(shape).astype(cotangent.dtype),)


_patches.defvjp(_patches_fwd, _patches_bwd)


def im2col_conv(x: jax.Array, kernel: jax.Array, padding: int) -> jax.Array:
    """Stride-1 convolution [B, H, W, Cin] * [k, k, Cin, Cout] -> [B, H', W', Cout] as ONE matmul over
    patches [B*H'*W', k*k*Cin] (taps in row-major (i, j) order, matching the kernel's layout). On the 6x6
    latent grid XLA:CPU runs this (and its gradient: a scatter-add plus two matmuls) 2-3x faster than its
    generic convolution. Patches are built from static slices (faster than an index gather) and their
    gradient is a scatter-add (faster than the slices' pads); see benchmarks/README.md.
    tests/test_fast_ops.py checks outputs and gradients against lax.conv_general_dilated."""
    return _patch_matmul(x, kernel, padding)[0]


def _im2col(x: jax.Array, k: int, padding: int) -> tuple[jax.Array, tuple[int, int, int]]:
    """Patches [B*H'*W', k*k*Cin] of a stride-1 k x k convolution of x [B, H, W, Cin], and (B, H', W')."""
    b, h, w, cin = x.shape
    out_h, out_w = h + 2 * padding - k + 1, w + 2 * padding - k + 1
    if k == 1 and padding == 0:
        return x.reshape(b * h * w, cin), (b, h, w)
    padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    return _patches(padded, (k, k), (out_h, out_w)).reshape(b * out_h * out_w, k * k * cin), (b, out_h, out_w)


def _patch_matmul(x: jax.Array, kernel: jax.Array, padding: int) -> tuple[jax.Array, jax.Array]:
    """The stride-1 convolution as one matmul: (output [B, H', W', Cout], patches [B*H'*W', k*k*Cin])."""
    patches, shape = _im2col(x, kernel.shape[0], padding)
    return (patches @ kernel.reshape(-1, kernel.shape[-1])).reshape(*shape, kernel.shape[-1]), patches


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def gemm_conv(x: jax.Array, kernel: jax.Array, padding: int) -> jax.Array:
    """im2col_conv's forward (one matmul over patches) with a gradient of two more matmuls and no scatter: the
    kernel's is patches^T @ dy, the input's the transposed convolution, itself a stride-1 convolution of dy with the
    kernel flipped and its channels swapped, padded k-1-p. Deterministic on every backend (a GPU's scatter-add is
    not) and GEMMs a GPU can capture in its command buffers; on XLA:CPU its gradient is ~15% slower than
    im2col_conv's scatter (benchmarks/README.md). Equal to lax.conv_general_dilated (tests/test_fast_ops.py)."""
    return _gemm_forward(x, kernel, padding)[0]


def _check_gemm_padding(k: int, padding: int) -> None:
    if not 0 <= padding <= k - 1:  # the input's gradient pads k - 1 - padding
        raise ValueError(f"gemm_conv needs 0 <= padding <= kernel - 1, got kernel {k} padding {padding}")


def _gemm_forward(x, kernel, padding):
    _check_gemm_padding(kernel.shape[0], padding)
    return _patch_matmul(x, kernel, padding)


def _gemm_conv_fwd(x, kernel, padding):
    y, patches = _gemm_forward(x, kernel, padding)
    return y, (patches, kernel)


def _gemm_conv_bwd(padding, residuals, cotangent):
    patches, kernel = residuals
    k, cout = kernel.shape[0], kernel.shape[-1]
    # Vmapped over seeds, XLA's GPU compiler fused the patches' transpose into this batched dot and then "couldn't
    # find output tile sizes" for it (the encoder's last strided convolution, 5 seeds: tests/test_kernels.py)
    patches = jax.lax.optimization_barrier(patches)
    kernel_grad = (patches.T @ cotangent.reshape(-1, cout)).reshape(kernel.shape)
    input_grad = _gemm_forward(cotangent, _flip(kernel), k - 1 - padding)[0]
    return input_grad, kernel_grad


gemm_conv.defvjp(_gemm_conv_fwd, _gemm_conv_bwd)


def _flip(kernel: jax.Array) -> jax.Array:
    """The kernel [..., k, k, Cin, Cout] of a stride-1 convolution's transpose: taps reversed, input and output
    channels swapped (leading axes, such as paired_gemm_conv's pair, kept)."""
    return kernel[..., ::-1, ::-1, :, :].swapaxes(-2, -1)


def _pair_conv(pair: jax.Array, kernels: jax.Array, padding: int) -> jax.Array:
    """Two stride-1 convolutions as ONE batched matmul: pair [2, B, H, W, C] * kernels [2, k, k, C, N] ->
    [2, B, H', W', N], half i with kernel i."""
    k = kernels.shape[1]
    patches, (b2, out_h, out_w) = _im2col(pair.reshape(-1, *pair.shape[2:]), k, padding)
    out = jnp.einsum("zmk,zkn->zmn", patches.reshape(2, -1, patches.shape[-1]), kernels.reshape(2, -1, kernels.shape[-1]))
    return out.reshape(2, b2 // 2, out_h, out_w, -1), patches


def _pair_inputs(x: jax.Array, y: jax.Array, kernel_x: jax.Array, kernel_y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x, y stacked [2, B, H, W, C] and the kernels [2, k, k, C, N], the fewer input channels zero-padded to C."""
    if x.shape[:3] != y.shape[:3] or kernel_x.shape[:2] != kernel_y.shape[:2] or kernel_x.shape[3] != kernel_y.shape[3]:
        raise ValueError(f"paired_gemm_conv needs one grid, one kernel size and one output width, got inputs {x.shape} "
                         f"and {y.shape}, kernels {kernel_x.shape} and {kernel_y.shape}")
    c = max(x.shape[-1], y.shape[-1])
    pad = lambda a, axis: jnp.pad(a, [(0, c - n if i == axis else 0) for i, n in enumerate(a.shape)])
    return jnp.stack([pad(x, 3), pad(y, 3)]), jnp.stack([pad(kernel_x, 2), pad(kernel_y, 2)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def paired_gemm_conv(x: jax.Array, y: jax.Array, kernel_x: jax.Array, kernel_y: jax.Array, padding: int) -> jax.Array:
    """jnp.stack([gemm_conv(x, kernel_x), gemm_conv(y, kernel_y)]): two stride-1 k x k convolutions to one width, of
    inputs on one grid, as ONE batched matmul (the fewer input channels zero-padded, inputs and kernels stacked).
    Its gradient is two batched matmuls too: the kernels' and the inputs' (the transposed convolutions, as in
    gemm_conv). A ConvLSTM cell's conv_x and conv_h: on a GPU half the matmuls of a step, each with its split-K
    reduction (benchmarks/kernels.py), and the pair stays stacked for paired_layer_norm. The same sums plus exact
    zeros: equal to two gemm_convs (tests/test_fast_ops.py)."""
    return _paired_fwd(x, y, kernel_x, kernel_y, padding)[0]


def _paired_fwd(x, y, kernel_x, kernel_y, padding):
    _check_gemm_padding(kernel_x.shape[0], padding)
    pair, kernels = _pair_inputs(x, y, kernel_x, kernel_y)
    out, patches = _pair_conv(pair, kernels, padding)
    return out, (patches, kernels, jnp.zeros((0, x.shape[-1])), jnp.zeros((0, y.shape[-1])))


def _paired_bwd(padding, residuals, cotangent):
    patches, kernels, like_x, like_y = residuals  # the last two: the inputs' channel counts
    cx, cy = like_x.shape[1], like_y.shape[1]
    flat = cotangent.reshape(2, -1, cotangent.shape[-1])
    kernel_grads = jnp.einsum("zmk,zmn->zkn", patches.reshape(2, -1, patches.shape[-1]), flat).reshape(kernels.shape)
    input_grads = _pair_conv(cotangent, _flip(kernels), kernels.shape[1] - 1 - padding)[0]
    return input_grads[0, ..., :cx], input_grads[1, ..., :cy], kernel_grads[0, :, :, :cx], kernel_grads[1, :, :, :cy]


paired_gemm_conv.defvjp(_paired_fwd, _paired_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rows_conv(x: jax.Array, kernel: jax.Array, padding: int) -> jax.Array:
    """'Same' stride-1 convolution [B, H, W, Cin] * [k, k, Cin, Cout] (k = 2 * padding + 1) that skips the
    kernel rows reading only zero padding: for each kernel row i, a matmul over row patches [B*rows*W, k*Cin]
    of the output rows where input row y + i - padding exists. On the 6x6 grid with k = 5 that is 24 of 30
    row products (80% of im2col_conv's FLOPs). Equal to im2col_conv (tests/test_fast_ops.py)."""
    b, h, w, cin = x.shape
    k, cout = kernel.shape[0], kernel.shape[-1]
    if k != 2 * padding + 1:
        raise ValueError(f"rows_conv needs 'same' padding, got kernel {k} padding {padding}")
    padded = jnp.pad(x, ((0, 0), (0, 0), (padding, padding), (0, 0)))
    out = 0.0
    for i in range(k):
        shift = i - padding
        first, last = max(0, -shift), min(h, h - shift)  # output rows whose input row y + shift exists
        patches = _patches(padded[:, first + shift:last + shift], (1, k), (last - first, w))
        part = (patches.reshape(-1, k * cin) @ kernel[i].reshape(k * cin, cout)).astype(jnp.float32)
        out = out + jnp.pad(part.reshape(b, last - first, w, cout), ((0, 0), (first, h - last), (0, 0), (0, 0)))
    return out.astype(x.dtype)  # the k row products summed in float32 (no-op casts for float32 inputs)


def _rows_conv_fwd(x, kernel, padding):
    return rows_conv(x, kernel, padding), (x, kernel)


def _rows_conv_bwd(padding, residuals, cotangent):
    # The gradient as im2col_conv's: two large matmuls beat five row-sized ones under XLA:CPU.
    x, kernel = residuals
    return jax.vjp(lambda x, kernel: im2col_conv(x, kernel, padding), x, kernel)[1](cotangent)


rows_conv.defvjp(_rows_conv_fwd, _rows_conv_bwd)


def space_to_depth_conv(x: jax.Array, kernel: jax.Array, padding: int, stride: int) -> tuple[jax.Array, jax.Array]:
    """A stride-s convolution as a stride-1 one with no padding: returns (input, kernel) such that a stride-1,
    unpadded convolution of them equals the stride-s convolution of x [B, H, W, C] with kernel [k, k, C, O] padded
    `padding`. Tap i = s*q + r of output o reads padded row s*(o + q) + r, which is row o + q of the padded input
    folded s x s into its channels ([B, (H+2p)/s, (W+2p)/s, s*s*C], channels (r_h, r_w, C)), through the kernel
    folded the same way ([k/s, k/s, s*s*C, O]). Needs k and H + 2p, W + 2p divisible by s."""
    b, h, w, c = x.shape
    k, out = kernel.shape[0], kernel.shape[-1]
    hp, wp = h + 2 * padding, w + 2 * padding
    if k % stride or hp % stride or wp % stride:
        raise ValueError(f"a stride-{stride} convolution as a stride-1 one needs kernel {k} and padded size "
                         f"{hp}x{wp} divisible by {stride}")
    x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    x = x.reshape(b, hp // stride, stride, wp // stride, stride, c).transpose(0, 1, 3, 2, 4, 5)
    kernel = kernel.reshape(k // stride, stride, k // stride, stride, c, out).transpose(0, 2, 1, 3, 4, 5)
    return (x.reshape(b, hp // stride, wp // stride, stride * stride * c),
            kernel.reshape(k // stride, k // stride, stride * stride * c, out))


CONV_IMPLS = ("im2col", "gemm", "rows", "xla")


def conv2d(x: jax.Array, kernel: jax.Array, padding: int, impl: str, stride: int = 1) -> jax.Array:
    """Convolution [B, H, W, Cin] * [k, k, Cin, Cout] with symmetric `padding` and `stride`, computed by
    `im2col_conv` ("im2col"), `gemm_conv` ("gemm"), `rows_conv` ("rows") or lax.conv_general_dilated ("xla": cuDNN
    on a GPU). The matmul forms take a stride > 1 as a stride-1 convolution (`space_to_depth_conv`)."""
    if impl == "xla":
        pad = ((padding, padding), (padding, padding))
        return jax.lax.conv_general_dilated(x, kernel, (stride, stride), pad,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if impl not in CONV_IMPLS:
        raise ValueError(f"unknown conv impl {impl!r} (one of {', '.join(CONV_IMPLS)})")
    if stride != 1:
        (x, kernel), padding = space_to_depth_conv(x, kernel, padding, stride), 0
    return {"im2col": im2col_conv, "gemm": gemm_conv, "rows": rows_conv}[impl](x, kernel, padding)


# PyTorch's default conv kernel init: Kaiming-uniform with a=sqrt(5), i.e. U(+-1/sqrt(fan_in)).
CONV_KERNEL_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class ConvKernel(nn.Module):
    """A Conv's kernel alone ("kernel" [k, k, Cin, Cout], Conv's init, under the module's name), for convolutions
    computed together (paired_gemm_conv)."""
    features: int
    kernel_size: int

    @nn.compact
    def __call__(self, in_features: int) -> jax.Array:
        k = self.kernel_size
        return self.param("kernel", CONV_KERNEL_INIT, (k, k, in_features, self.features))


class Conv(nn.Module):
    """A 2-D convolution with PyTorch's default init (kernel U(+-1/sqrt(fan_in)) as Kaiming-uniform with
    a=sqrt(5), optional bias U(+-1/sqrt(fan_in))) and flax.linen.Conv's parameters ("kernel" [k, k, Cin, Cout],
    "bias"), so its auto name (Conv_0, ...) and init equal nn.Conv's. Computed by `conv2d` with `impl`, in `dtype`
    (input and float32 parameters cast to it)."""
    features: int
    kernel_size: int
    padding: int
    stride: int = 1
    use_bias: bool = False
    impl: str = "xla"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, cin = self.kernel_size, x.shape[-1]
        kernel = self.param("kernel", CONV_KERNEL_INIT, (k, k, cin, self.features))
        y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.padding, self.impl, self.stride)
        if self.use_bias:
            y = y + self.param("bias", uniform_init(1.0 / math.sqrt(cin * k * k)), (self.features,)).astype(self.dtype)
        return y


def dense(features: int, in_features: int, name: str | None = None, dtype: Any = jnp.float32) -> nn.Dense:
    bound = 1.0 / math.sqrt(in_features)
    return nn.Dense(features, kernel_init=uniform_init(bound), bias_init=uniform_init(bound), name=name, dtype=dtype,
                    param_dtype=jnp.float32)


def spatial_layer_norm(epsilon: float, name: str | None = None, dtype: Any = jnp.float32,
                       impl: str = "flax") -> nn.Module:
    """LayerNorm over the whole (H, W, C) tensor per sample with elementwise affine of shape (H, W, C), statistics
    and normalisation in float32, output cast to `dtype`. `impl` (ComputeConfig.layer_norm): "flax" (Flax's
    LayerNorm) or "fused" (`LayerNorm`: `fused_layer_norm`, fewer GPU kernels); the same parameters either way."""
    if impl == "flax":
        return nn.LayerNorm(epsilon=epsilon, reduction_axes=(-3, -2, -1), feature_axes=(-3, -2, -1), name=name,
                            dtype=dtype, param_dtype=jnp.float32)
    if impl != "fused":
        raise ValueError(f"unknown layer norm impl {impl!r} (flax or fused)")
    return LayerNorm(epsilon, dtype, name=name)


def _moments(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The means of a and b [N, F] over F, as ONE variadic reduction (XLA:GPU: one reduction kernel for both sums,
    with no copy of the two stacked first)."""
    add = lambda x, y: (x[0] + y[0], x[1] + y[1])
    sums = jax.lax.reduce((a, b), (jnp.zeros((), a.dtype), jnp.zeros((), b.dtype)), add, (1,))
    return sums[0] / a.shape[1], sums[1] / b.shape[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def fused_layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
    """Layer norm of x [..., H, W, C] over its last three axes, float32 out: (x - mean) / sqrt(var + epsilon) *
    scale + bias with var = E[x^2] - E[x]^2 (Flax's fast variance). Its statistics are one reduction, and its
    gradient's two sums another (`_moments`); equal to Flax's LayerNorm (tests/test_fast_ops.py)."""
    return _layer_norm_fwd(x, scale, bias, epsilon)[0]


def _layer_norm_fwd(x, scale, bias, epsilon):
    flat = x.astype(jnp.float32).reshape(-1, math.prod(x.shape[-3:]))
    mean, mean_sq = _moments(flat, flat * flat)
    inv = jax.lax.rsqrt(jnp.maximum(mean_sq - mean * mean, 0.0) + epsilon)
    xhat = ((flat - mean[:, None]) * inv[:, None]).reshape(x.shape)
    return xhat * scale + bias, (xhat, inv, scale, jnp.zeros((0,), x.dtype))  # the last: x's dtype for dx


def _layer_norm_bwd(epsilon, residuals, dy):
    xhat, inv, scale, like_x = residuals
    dy = dy.astype(jnp.float32)
    n = math.prod(xhat.shape[-3:])
    g, flat_xhat = (dy * scale).reshape(-1, n), xhat.reshape(-1, n)
    mean_g, mean_gx = _moments(g, g * flat_xhat)
    dx = inv[:, None] * (g - mean_g[:, None] - flat_xhat * mean_gx[:, None])
    # scale and bias broadcast over xhat's other axes (its leading ones, and where they have size 1): their sums,
    # as one reduction
    lead = xhat.ndim - scale.ndim
    axes = (*range(lead), *(lead + i for i, n in enumerate(scale.shape) if n == 1 and xhat.shape[lead + i] != 1))
    per_feature = jnp.sum(jnp.stack([dy * xhat, dy]), tuple(1 + a for a in axes)).reshape(2, *scale.shape)
    return dx.reshape(xhat.shape).astype(like_x.dtype), per_feature[0], per_feature[1]


fused_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def paired_layer_norm(pair: jax.Array, x_affine: tuple[jax.Array, jax.Array], y_affine: tuple[jax.Array, jax.Array],
                      epsilon: float) -> jax.Array:
    """fused_layer_norm(pair[0]) + fused_layer_norm(pair[1]) (each with its (scale, bias)), pair [2, ..., H, W, C]
    (as paired_gemm_conv leaves it), as ONE layer norm: one reduction for both halves' statistics, one for both
    gradients'."""
    stack = lambda a, b: jnp.stack([a, b]).reshape(2, *[1] * (pair.ndim - 4), *a.shape)
    out = fused_layer_norm(pair, stack(x_affine[0], y_affine[0]), stack(x_affine[1], y_affine[1]), epsilon)
    return out[0] + out[1]


def _affine(module: nn.Module, shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """Flax LayerNorm's affine parameters in `module`: "scale" ones and "bias" zeros of `shape`, float32."""
    return (module.param("scale", nn.initializers.ones, shape, jnp.float32),
            module.param("bias", nn.initializers.zeros, shape, jnp.float32))


class LayerNormAffine(nn.Module):
    """The affine parameters of a layer norm over [H, W, C] alone, as `LayerNorm` creates them: shape -> (scale,
    bias). For a module that normalises two tensors as one (`paired_layer_norm`) and keeps each norm's parameters
    under its own name."""

    @nn.compact
    def __call__(self, shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
        return _affine(self, shape)


class LayerNorm(nn.Module):
    """`spatial_layer_norm`'s "fused" form: Flax's LayerNorm parameters ("scale" ones, "bias" zeros, both [H, W, C]
    float32; named LayerNorm_0, ... as Flax's), computed by `fused_layer_norm`, output cast to `dtype`."""
    epsilon: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return fused_layer_norm(x, *_affine(self, x.shape[-3:]), self.epsilon).astype(self.dtype)


class BatchNorm(nn.Module):
    """PyTorch BatchNorm2d semantics: normalise with the biased batch variance, but track the running
    variance with the unbiased one (SPEC 12.1). Running stats live in the `batch_stats` collection.

    Statistics, running averages and the normalisation are float32; the output is cast to `dtype`. `variance`
    (ComputeConfig.batch_norm) says how train mode computes the batch variance: "two_pass" (the mean of (x -
    mean)^2: a reduction after the mean's) or "one_pass" (E[x^2] - E[x]^2, clipped at 0: two reductions of x,
    neither waiting for the other: fewer GPU kernels; Flax's fast variance). The same parameters and statistics
    either way."""
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Any = jnp.float32
    variance: str = "two_pass"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,))
        bias = self.param("bias", nn.initializers.zeros, (features,))
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,))
        ra_var = self.variable("batch_stats", "var", jnp.ones, (features,))
        x = x.astype(jnp.float32)
        if train:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(x, axes)
            if self.variance == "two_pass":
                var = jnp.mean(jnp.square(x - mean), axes)
            elif self.variance == "one_pass":  # not one variadic lax.reduce: XLA:GPU's compile of that never ended
                var = jnp.maximum(jnp.mean(x * x, axes) - mean * mean, 0.0)
            else:
                raise ValueError(f"unknown batch norm variance {self.variance!r} (two_pass or one_pass)")
            if not self.is_initializing():
                n = x.size // features
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var * (n / max(n - 1, 1))
        else:
            mean, var = ra_mean.value, ra_var.value
        return ((x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias).astype(self.dtype)


# Sub-pixel form of ConvTranspose2d(k=4, s=2, p=1): output row 2m+a reads input rows m+d, d in {-1,0,1},
# through kernel tap k = a + 1 - 2d (when 0 <= k <= 3). _TAP[d+1, a] is that tap, -1 where none exists.
_TAP = np.array([[3, -1], [1, 2], [-1, 0]])


class Upsample2x(nn.Module):
    """PyTorch ConvTranspose2d(in, out, kernel 4, stride 2, padding 1) in NHWC: [B,H,W,in] -> [B,2H,2W,out].

    The parameters are exactly the transposed convolution's: `kernel` [4, 4, in, out] (PyTorch's
    (in, out, kH, kW) weight permuted) and `bias` [out]. `mode` only picks how it is computed:
    "transpose" = input-dilated convolution with the flipped kernel (the textbook formulation);
    "subpixel" = one 3x3 convolution to 4*out channels followed by depth-to-space, which XLA:CPU runs
    several times faster (same result to float rounding; tests/test_networks.py checks it); `impl` computes that
    convolution (`conv2d`; "transpose" is XLA's own). Computed in `dtype`.
    """
    features: int
    mode: str = "subpixel"
    dtype: Any = jnp.float32
    impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_features = x.shape[-1]
        bound = 1.0 / math.sqrt(self.features * 16)  # PyTorch takes fan_in from the weight's dim 1 (= out)
        kernel = self.param("kernel", uniform_init(bound), (4, 4, in_features, self.features))
        bias = self.param("bias", uniform_init(bound), (self.features,)).astype(self.dtype)
        x = x.astype(self.dtype)
        dn = ("NHWC", "HWIO", "NHWC")
        if self.mode == "transpose":
            if self.impl != "xla":
                raise ValueError(f"upsample 'transpose' is XLA's input-dilated convolution; conv impl {self.impl!r} "
                                 "needs upsample 'subpixel'")
            y = jax.lax.conv_general_dilated(x, kernel[::-1, ::-1].astype(self.dtype), (1, 1), ((2, 2), (2, 2)),
                                             lhs_dilation=(2, 2), dimension_numbers=dn)
            return y + bias
        if self.mode != "subpixel":
            raise ValueError(f"unknown upsample mode {self.mode!r}")
        mask = jnp.asarray(_TAP >= 0, kernel.dtype)
        taps = np.maximum(_TAP, 0)
        # k3[jh, ah, jw, aw] = kernel[_TAP[jh, ah], _TAP[jw, aw]] (zero where no tap), then (3,3,in,2,2,out).
        k3 = kernel[taps[:, :, None, None], taps[None, None, :, :]] * (mask[:, :, None, None] * mask[None, None])[..., None, None]
        k3 = k3.transpose(0, 2, 4, 1, 3, 5).reshape(3, 3, in_features, 4 * self.features).astype(self.dtype)
        y = conv2d(x, k3, 1, self.impl)
        b, h, w, _ = y.shape
        y = y.reshape(b, h, w, 2, 2, self.features).transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, self.features)
        return y + bias


def count_params(tree: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))
