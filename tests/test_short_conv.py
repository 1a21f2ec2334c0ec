"""Tests of ``ops.short_conv``: the causal depthwise convolution with a cache.

Definition (weight [width, channels], x [batch, time, channels]):
``xpad = concat(cache or width-1 zero steps, x)`` along time,
``y[t, c] = activation(sum_w weight[w, c] * xpad[t + w, c] + bias[c])`` (``weight[width-1]``
multiplies the current token), and ``new_cache`` = the last ``width-1`` rows of ``xpad``.
``oracle`` below transcribes it in float64 NumPy. Properties checked, compiled and op by op
(chex variants): the full sequence equals the oracle; a sequence cut in two calls joined by the
cache equals one call; ``short_conv_step`` token by token equals the full call; malformed
arguments raise a ``ValueError`` that names the argument.

Tolerances (relative RMS error): 1e-5 for a float32 result (a sum of at most 4 products),
1e-2 for a bfloat16 one (a few bf16 ulps). The cache is a copy of inputs: it must be exact.
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ops.short_conv import short_conv, short_conv_step
from tests import _numerics as num

TOL_F32 = 1e-5
TOL_BF16 = 1e-2


def tolerance(x) -> float:
  """``TOL_BF16`` for a bfloat16 array, else ``TOL_F32``."""
  return TOL_BF16 if x.dtype == jnp.bfloat16 else TOL_F32


def oracle(x, weight, bias=None, cache=None, activation=None):
  """The definition in float64 NumPy. Returns (y, new_cache)."""
  x, weight = num.to_f64(x), num.to_f64(weight)
  (batch, time, channels), width = x.shape, weight.shape[0]
  previous = np.zeros((batch, width - 1, channels)) if cache is None else num.to_f64(cache)
  xpad = np.concatenate([previous, x], axis=1)
  y = sum(weight[w] * xpad[:, w:w + time] for w in range(width))
  if bias is not None:
    y = y + num.to_f64(bias)
  if activation == "silu":
    y = y / (1.0 + np.exp(-y))
  return y, xpad[:, xpad.shape[1] - (width - 1):]


@dataclasses.dataclass(frozen=True)
class Case:
  """One problem: shapes, dtype of x/cache, options and the seed of its random inputs."""

  batch: int = 2
  time: int = 6
  channels: int = 5
  width: int = 4
  dtype: str = "float32"
  with_bias: bool = True
  with_cache: bool = True
  activation: str | None = "silu"
  seed: int = 0

  def arguments(self) -> dict:
    """Keyword arguments of ``short_conv`` (bias and cache only where switched on)."""
    rng = np.random.default_rng(self.seed)
    args = dict(
        x=num.normal(rng, (self.batch, self.time, self.channels), self.dtype),
        weight=num.normal(rng, (self.width, self.channels), scale=self.width ** -0.5),
        bias=num.normal(rng, (self.channels,)) if self.with_bias else None,
        cache=(num.normal(rng, (self.batch, self.width - 1, self.channels), self.dtype)
               if self.with_cache else None),
        activation=self.activation)
    return {k: v for k, v in args.items() if v is not None}


@st.composite
def cases(draw, min_time: int = 1) -> Case:
  """Cases of drawn shapes (width 1 to 4, so an empty cache too), dtype and options.

  Few distinct shapes: the op is tiny, so compiling (and, op by op, dispatching) dominates.
  """
  return Case(
      batch=draw(st.integers(1, 2)), time=draw(st.integers(min_time, 8)),
      channels=draw(st.sampled_from([1, 3, 16])), width=draw(st.integers(1, 4)),
      dtype=draw(num.float_dtypes()), with_bias=draw(st.booleans()),
      with_cache=draw(st.booleans()), activation=draw(st.sampled_from([None, "silu"])),
      seed=draw(num.seeds()))


def _assert_matches(ref: tuple, got: tuple) -> None:
  """(y, new_cache) agree: y to the dtype's tolerance, the cache exactly."""
  num.assert_close(ref[0], got[0], tolerance(got[0]), "y")
  num.assert_close(ref[1], got[1], 0.0, "new_cache")


def _static(fn, args: dict):
  """``fn`` with the activation bound (a string cannot be traced), and the array arguments."""
  arrays = {k: v for k, v in args.items() if k != "activation"}
  return functools.partial(fn, activation=args.get("activation")), arrays


class ShortConvTest(chex.TestCase):
  """Each property compiled and op by op."""

  @chex.variants(with_jit=True, without_jit=True)
  @given(case=cases())
  def test_matches_oracle(self, case):
    args = case.arguments()
    fn, arrays = _static(short_conv, args)
    _assert_matches(oracle(**args), self.variant(fn)(**arrays))

  @chex.variants(with_jit=True, without_jit=True)
  @given(case=cases(min_time=2), data=st.data())
  def test_two_calls_equal_one(self, case, data):
    """Cutting at any point and passing the cache gives the one-call output and cache."""
    cut = data.draw(st.integers(1, case.time - 1), label="cut")
    args = case.arguments()
    fn, arrays = _static(short_conv, args)
    conv = self.variant(fn)
    full = conv(**arrays)
    x, cache = arrays.pop("x"), arrays.pop("cache", None)
    y_head, cache = conv(x[:, :cut], cache=cache, **arrays)
    y_tail, cache = conv(x[:, cut:], cache=cache, **arrays)
    _assert_matches(full, (jnp.concatenate([y_head, y_tail], axis=1), cache))

  @chex.variants(with_jit=True, without_jit=True)
  @given(case=cases())
  def test_step_equals_full(self, case):
    """``short_conv_step`` over the tokens gives the full call's outputs and cache."""
    args = case.arguments()
    fn, arrays = _static(short_conv, args)
    step_fn, _ = _static(short_conv_step, args)
    step = self.variant(step_fn)
    full = fn(**arrays)
    x, cache = arrays.pop("x"), arrays.pop("cache", None)
    outputs = []
    for t in range(case.time):
      y_t, cache = step(x[:, t], cache=cache, **arrays)
      outputs.append(y_t)
    _assert_matches(full, (jnp.stack(outputs, axis=1), cache))


# --- malformed arguments ----------------------------------------------------------------------

def _grow(axis: int):
  """A change that lengthens ``axis`` by one (repeating its first entry)."""
  return lambda x: jnp.concatenate([x, jnp.take(x, jnp.array([0]), axis)], axis)


def _replace(name: str, make):
  """A change of the valid arguments that sets ``name`` to ``make(old value)``."""
  return lambda args: {**args, name: make(args[name])}


BAD_ARGUMENTS = {  # id: (change, regex the message must match); x is [batch, time, channels]
    "x_rank": (_replace("x", lambda x: x[0]), r"\bx\b"),
    "x_channels": (_replace("x", _grow(2)), r"\bx\b"),
    "weight_rank": (_replace("weight", lambda w: w[None]), r"\bweight\b"),
    "bias_shape": (_replace("bias", _grow(0)), r"\bbias\b"),
    "cache_width": (_replace("cache", _grow(1)), r"\bcache\b"),
    "cache_channels": (_replace("cache", _grow(2)), r"\bcache\b"),
    "cache_batch": (_replace("cache", _grow(0)), r"\bcache\b"),
    "activation_unknown": (_replace("activation", lambda _: "gelu_tanh"), r"\bactivation\b"),
}


@pytest.mark.parametrize("change, pattern", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_argument_raises(change, pattern):
  with pytest.raises(ValueError, match=pattern):
    short_conv(**change(Case().arguments()))


@pytest.mark.parametrize("change, pattern", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_step_argument_raises(change, pattern):
  """The same changes, then x cut to its first token ([batch, channels])."""
  args = change(Case().arguments())
  with pytest.raises(ValueError, match=pattern):
    short_conv_step(**{**args, "x": args["x"][:, 0]})
