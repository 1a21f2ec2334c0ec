"""Per-token math shared by the Pallas kernels ("pallas_gpu", "pallas_tpu") of the selective scan.

Both kernels hold one channel block's state in float32 and walk its tokens in order; they differ
in the state's layout. The GPU kernel's state is [block_d, state] and its per-token vectors are
1-D ([block_d] per channel, [state] for B and C); the TPU kernel's state is [state, block_d]
(channels on lanes) and its per-token values are already 2-D and broadcastable ([1, block_d]
rows, [state, 1] columns). ``Layout`` hides the difference, so the scan step, the readout and
the adjoint step are written once.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

F32 = jnp.float32


class Arith(NamedTuple):
  """The float32 primitives the per-token math below is written in: ``EXACT`` is jnp's; the GPU
  kernels pass their instructions' (``pallas_gpu._arith``: fused multiply-add, ``exp`` as one
  ``exp2``, the approximate reciprocal), where jnp's lower to libdevice calls and a
  range-checked division."""

  fma: Callable  # (a, b, c) -> a * b + c
  exp: Callable
  reciprocal: Callable


EXACT = Arith(fma=lambda a, b, c: a * b + c, exp=jnp.exp, reciprocal=lambda x: 1.0 / x)

_ATANH_SERIES = tuple(1.0 / k for k in (13, 11, 9, 7, 5, 3, 1))  # coefficients of s^(k-1)


def softplus(x, arith: Arith = EXACT):
  """log(1 + e^x) = max(x, 0) + log1p(e) with e = e^-|x| in (0, 1], and log1p(e) = 2 atanh(s)
  with s = e / (2 + e) in (0, 1/3], summed as its odd series to s^13 (truncated below 2e-8
  relative): no branch. On a GPU ``jnp.log1p`` is libdevice's ``log1pf``, whose branch for
  special values split every token of the scan's kernels into basic blocks that the compiler
  would not schedule loads across (docs/kernels.md, selective scan version 5)."""
  e = arith.exp(-jnp.abs(x))
  s = e * arith.reciprocal(2.0 + e)
  s2 = s * s
  series = arith.fma(s2, _ATANH_SERIES[0], _ATANH_SERIES[1])
  for coefficient in _ATANH_SERIES[2:]:
    series = arith.fma(series, s2, coefficient)
  return arith.fma(2.0 * s, series, jnp.maximum(x, 0.0))


def sigmoid(x, arith: Arith = EXACT):
  """1 / (1 + e^-x) in ``arith``'s primitives."""
  return arith.reciprocal(1.0 + arith.exp(-x))


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where the state axis is in a state-shaped array, and whether token values need expanding.

  ``state_axis``: the state's axis in [.., ..] state-shaped arrays (the other is the channels').
  ``expand``: token values are 1-D (a channel vector [block_d] or a state vector [state]) and
  are expanded to broadcast; otherwise they are 2-D already and reductions keep their axis.
  """

  state_axis: int
  expand: bool

  def chan(self, x):
    """A channel vector, broadcastable against the state."""
    return jnp.expand_dims(x, self.state_axis) if self.expand else x

  def state(self, x):
    """A state vector (B or C), broadcastable against the state."""
    return jnp.expand_dims(x, 1 - self.state_axis) if self.expand else x

  def sum_state(self, x):
    """Sums a state-shaped array over the state: a channel vector."""
    return jnp.sum(x, axis=self.state_axis, keepdims=not self.expand)

  def sum_channels(self, x):
    """Sums a state-shaped array over the channels: a state vector."""
    return jnp.sum(x, axis=1 - self.state_axis, keepdims=not self.expand)


GPU_LAYOUT = Layout(state_axis=1, expand=True)  # state [block_d, state]
TPU_LAYOUT = Layout(state_axis=0, expand=False)  # state [state, block_d]


class Token(NamedTuple):
  """One token's float32 inputs of a channel block; optional entries are None when absent."""

  u: jax.Array  # channel vector
  raw: jax.Array  # channel vector: delta + delta_bias, before the softplus
  dt: jax.Array  # channel vector: the step (activated, zero for padding tokens)
  B: jax.Array  # state vector
  C: jax.Array  # state vector
  z: jax.Array | None  # channel vector
  keep: jax.Array | None  # broadcastable scalar: 0 where the state restarts before this token


def step_size(raw, delta_softplus: bool, valid, arith: Arith = EXACT):
  """The step from delta + delta_bias; ``valid`` (0 for padding tokens, or None) masks it."""
  dt = softplus(raw, arith) if delta_softplus else raw
  return dt if valid is None else dt * valid


def decay_rate(A):
  """A log2(e), so that a token's decay exp(dt A) is exp2(dt A log2(e)): one special-function
  instruction on a GPU, where ``exp`` is a libdevice call of about ten instructions."""
  return A * math.log2(math.e)


def advance(h, tok: Token, rate, lay: Layout):
  """(state after the token, its decay exp(dt A)) from the state before it; ``rate`` is
  ``decay_rate(A)``."""
  if tok.keep is not None:
    h = h * tok.keep
  decay = jnp.exp2(lay.chan(tok.dt) * rate)
  return decay * h + lay.chan(tok.dt * tok.u) * lay.state(tok.B), decay


def readout(h, tok: Token, D, lay: Layout):
  """C h + D u: the output before the gate."""
  y = lay.sum_state(h * lay.state(tok.C))
  return y if D is None else y + D * tok.u


def gate(y, tok: Token, arith: Arith = EXACT):
  """The output: y gated by SiLU(z) (y itself without z)."""
  return y if tok.z is None else y * tok.z * sigmoid(tok.z, arith)


class TokenGrads(NamedTuple):
  """One token's gradients; None where the input is absent."""

  du: jax.Array  # channel vector
  draw: jax.Array  # channel vector: d loss / d (delta + delta_bias), i.e. ddelta and d bias
  dz: jax.Array | None  # channel vector
  dB: jax.Array  # state vector (this channel block's part)
  dC: jax.Array  # state vector (this channel block's part)
  dA: jax.Array  # state-shaped
  dD: jax.Array | None  # channel vector


def adjoint(g, tok: Token, h, h_before, decay, dout, A, D, lay: Layout, delta_softplus: bool,
            valid, arith: Arith = EXACT):
  """One token of the backward recurrence.

  Args:
    g: d loss / d (state after the token), from the later tokens only.
    tok: the token's inputs.
    h, h_before: the states after and before the token (h_before before the ``keep`` reset).
    decay: the token's exp(dt A).
    dout: d loss / d out for the token (a channel vector, float32).
    A, D: the parameters (D None when absent).
    lay: the state layout.
    delta_softplus: whether dt is softplus(raw).
    valid: 0 for padding tokens (a broadcastable float), or None.
    arith: the primitives of the sigmoids.

  Returns:
    (d loss / d (state before the token), the token's gradients).
  """
  h_prev = h_before if tok.keep is None else h_before * tok.keep
  ds, dz = dout, None
  if tok.z is not None:
    sig = sigmoid(tok.z, arith)
    dz = ds * readout(h, tok, D, lay) * sig * (1.0 + tok.z * (1.0 - sig))
    ds = ds * tok.z * sig
  g = g + lay.chan(ds) * lay.state(tok.C)  # d loss / d (state after the token)
  dC = lay.sum_channels(lay.chan(ds) * h)
  dB = lay.sum_channels(g * lay.chan(tok.dt * tok.u))
  g_decay = g * h_prev * decay  # d loss / d log(decay)
  dA = lay.chan(tok.dt) * g_decay
  gB = lay.sum_state(g * lay.state(tok.B))
  ddt = lay.sum_state(g_decay * A) + tok.u * gB
  if valid is not None:
    ddt = ddt * valid
  draw = ddt * sigmoid(tok.raw, arith) if delta_softplus else ddt
  du = tok.dt * gB
  dD = None
  if D is not None:
    du = du + ds * D
    dD = ds * tok.u
  g = g * decay if tok.keep is None else g * decay * tok.keep
  return g, TokenGrads(du=du, draw=draw, dz=dz, dB=dB, dC=dC, dA=dA, dD=dD)


def recomputing_vjp(forward: Callable, backward: Callable) -> Callable:
  """The kernels' ``custom_vjp``: ``scan(cfg, *arrays) -> (out, final_state)``.

  ``forward(cfg, *arrays, save_states)`` returns a dict with "out", "final_state" and, when
  ``save_states``, "chunk_states" (the state entering each chunk); ``backward(cfg, residuals,
  cotangents)`` gets ``(*arrays, chunk_states)`` and recomputes the rest.
  """

  @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
  def scan(cfg, *arrays):
    outs = forward(cfg, *arrays, save_states=False)
    return outs["out"], outs["final_state"]

  def scan_fwd(cfg, *arrays):
    outs = forward(cfg, *arrays, save_states=True)
    return (outs["out"], outs["final_state"]), (*arrays, outs["chunk_states"])

  scan.defvjp(scan_fwd, backward)
  return scan
