"""The PyTorch side of ``benchmarks.kernels``: fla's KDA and RWKV-7 kernels, fed the JAX inputs, timed with
CUDA events.

fla (flash-linear-attention, ``fla-core``) is a peer, not a dependency: it is imported only here and
only when asked; without torch, a CUDA device or fla every function's caller gets a reason string
from ``unavailable()`` and records an "n/a" row. The inputs cross from JAX through DLPack (zero
copy on the GPU; a float32 NumPy round trip otherwise), so both frameworks see the same values.

Timing: ``warmup`` calls, then ``iters`` calls each between two ``torch.cuda.Event``s on the current
stream, synchronised after every call; median and min milliseconds. A call includes its host
launch overhead wherever the GPU waits for it (as ``block_until_ready`` wall time does for JAX).
"""

from __future__ import annotations

import functools
import importlib
import statistics
from typing import Callable

import numpy as np

# jax argument names of ops.kda.kda -> the positional order of fla's chunk_kda / fused_recurrent_kda
KDA_ARGS = ("q", "k", "v", "g", "beta")
RWKV7_ARGS = ("r", "w", "k", "v", "a", "b")  # ops.rwkv7.rwkv7 -> fla's chunk_rwkv7


@functools.cache
def unavailable(module: str = "fla.ops.kda") -> str | None:
  """None when torch with a CUDA device and ``module`` import; else why not, for an "n/a" row."""
  try:
    torch = importlib.import_module("torch")
  except ImportError:
    return "torch not installed"
  if not torch.cuda.is_available():
    return "no CUDA device for torch"
  try:
    importlib.import_module(module)
  except ImportError as error:  # fla-core, or one of its dependencies (einops), is missing
    return f"{module} not importable: {error}"
  return None


def versions() -> dict:
  """torch, triton and fla versions where importable (for the JSON)."""
  found = {}
  for name in ("torch", "triton", "fla"):
    try:
      found[f"{name}_version"] = importlib.import_module(name).__version__
    except Exception:  # noqa: BLE001 - absent or broken: just not reported
      pass
  return found


def to_torch(x, dtype=None, requires_grad: bool = False):
  """A jax.Array as a CUDA torch tensor (a copy, so it may require grad)."""
  import torch
  try:
    t = torch.from_dlpack(x)
    if t.device.type != "cuda":
      raise TypeError("not on the GPU")
    t = t.clone()
  except Exception:  # noqa: BLE001 - DLPack refused (dtype, device): go through NumPy float32
    t = torch.from_numpy(np.asarray(x, np.float32)).to("cuda", getattr(torch, str(x.dtype)))
  if dtype is not None:
    t = t.to(dtype)
  return t.requires_grad_(requires_grad)


def rel_rms(expected, actual) -> float:
  """``rms(expected - actual) / rms(expected)`` in float64 sums; expected a jax.Array, actual a
  torch tensor of the same shape."""
  import torch
  ref = to_torch(expected).double()
  diff = ref - actual.double()
  denominator = torch.sqrt(torch.mean(ref * ref)).item()
  numerator = torch.sqrt(torch.mean(diff * diff)).item()
  return numerator / denominator if denominator > 0 else numerator


def time_cuda(fn: Callable[[], object], warmup: int, iters: int) -> dict:
  """Median and min milliseconds of ``fn()`` between CUDA events, after ``warmup`` calls."""
  import torch
  for _ in range(warmup):
    fn()
  torch.cuda.synchronize()
  times = []
  for _ in range(iters):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    times.append(start.elapsed_time(end))
  return dict(median_ms=statistics.median(times), min_ms=min(times))


def release() -> None:
  """Returns torch's cached blocks to the device, so JAX can have them for the next case."""
  import torch
  torch.cuda.synchronize()
  torch.cuda.empty_cache()


def _chunk(function: Callable, names: tuple[str, ...], inputs: dict, cotangents: tuple,
           backward: bool, **options) -> tuple[Callable, tuple[str, ...]]:
  """fla's chunkwise ``function(*inputs[names], initial_state=..., output_final_state=True,
  **options)``.

  Returns ``(fn, names)``: ``fn()`` runs the forward (o, final state) or, with ``backward``, the
  forward and the gradients wrt ``names`` and the initial state of
  ``<o, do> + <final_state, dht>``; ``names`` label its outputs like the JAX side's.
  """
  import torch
  args = [to_torch(inputs[name], requires_grad=backward) for name in names]
  h0 = to_torch(inputs["initial_state"], requires_grad=backward)
  options = dict(options, initial_state=h0, output_final_state=True)
  if not backward:
    def forward():
      with torch.no_grad():
        return function(*args, **options)
    return forward, ("o", "final_state")
  # The output's dtype (v's), as autograd wants.
  do = to_torch(cotangents[0], dtype=args[names.index("v")].dtype)
  dht = to_torch(cotangents[1])

  def forward_backward():
    o, ht = function(*args, **options)
    return torch.autograd.grad((o, ht), (*args, h0), (do, dht))

  return forward_backward, (*names, "initial_state")


def kda_chunk(inputs: dict, cotangents: tuple, backward: bool) -> tuple[Callable, tuple[str, ...]]:
  """fla ``chunk_kda`` on ``inputs`` (``ops.kda.kda``'s names: q, k, v, g, beta, initial_state),
  L2-normalising q and k in the kernel; see ``_chunk``."""
  from fla.ops.kda import chunk_kda
  return _chunk(chunk_kda, KDA_ARGS, inputs, cotangents, backward, use_qk_l2norm_in_kernel=True)


def rwkv7_chunk(inputs: dict, cotangents: tuple, backward: bool) -> tuple[Callable, tuple]:
  """fla ``chunk_rwkv7`` on ``inputs`` (``ops.rwkv7.rwkv7``'s names: r, w, k, v, a, b,
  initial_state; w the log decay), scale 1; see ``_chunk``."""
  from fla.ops.rwkv7 import chunk_rwkv7
  return _chunk(chunk_rwkv7, RWKV7_ARGS, inputs, cotangents, backward, scale=1.0)


def kda_fused_recurrent(inputs: dict, add_time_axis: bool = False) -> tuple[Callable, tuple]:
  """fla ``fused_recurrent_kda`` (forward only: fla 0.6 gives it no backward).

  ``inputs`` use ``ops.kda``'s names; with ``add_time_axis`` they are one decode token
  (q [B, H, K], ..., state [B, H, K, V] under the name "state") and get a length-1 time axis.
  Returns ``(fn, names)`` like ``kda_chunk``; the output o keeps the time axis only when given.
  """
  import torch
  from fla.ops.kda import fused_recurrent_kda
  args = [to_torch(inputs[name]) for name in KDA_ARGS]
  if add_time_axis:
    args = [a.unsqueeze(1) for a in args]
  h0 = to_torch(inputs["state" if add_time_axis else "initial_state"])
  options = dict(initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True)

  def forward():
    with torch.no_grad():
      o, ht = fused_recurrent_kda(*args, **options)
    return (o.squeeze(1) if add_time_axis else o), ht

  return forward, ("o", "state" if add_time_axis else "final_state")
