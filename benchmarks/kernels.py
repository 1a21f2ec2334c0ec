"""Kernel benchmark: this library's KDA, RWKV-7 and selective-scan forms beside fla and cuDNN
attention.

What is timed, on whatever device JAX sees (meant for an NVIDIA H200), in one table and one JSON:

  kda        ``ops.kda.kda`` forms "reference", "xla" and the platform's Pallas kernels
             ("pallas_gpu" on a GPU, "pallas_tpu" on a TPU); fla ``chunk_kda`` and
             ``fused_recurrent_kda`` (PyTorch/Triton, forward only: fla gives it no backward).
             B4 H16 K=V=128, T in {2048, 8192, 32768}; fwd and fwd+bwd.
             Inputs (as benchmarks/kda.py, fla's tests): q, k, v ~ U(0, 1) and
             beta = sigmoid(N(0, 1)) in bfloat16, g = logsigmoid(N(0, 1)) float32, an N(0, 1)
             float32 initial state, ``use_qk_l2norm_in_kernel=True``, final state returned.
             The backward takes the gradients wrt q, k, v, g, beta and the initial state of
             ``<o, do> + <final_state, dht>`` with random cotangents (do bf16-representable).
  attention  causal ``jax.nn.dot_product_attention(q, k, v, is_causal=True,
             implementation="cudnn")`` at the same B, T, H and D=128, bfloat16 N(0, 1) inputs
             ("xla" on CPU, where cuDNN is absent; ``--attention`` picks).
  decode     ``ops.kda.kda_step(..., implementation=...)`` ("reference" and the platform's
             kernel; kda_step has no "xla" form) vs fla ``fused_recurrent_kda`` on one token
             (q, k, v [B, 1, H, D], float32 state [B, H, K, V]); B in {4, 64}, H16 K=V=128.
  scan       ``ops.selective_scan.selective_scan`` forms "reference", "xla", the kernels with
             D, z, delta_bias and delta_softplus=True (inputs as benchmarks/selective_scan.py);
             B2 L4096 D2048 N16 and B8 L8192 D2048 N16; float32 and bfloat16 inputs; fwd and
             fwd+bwd (gradients of ``<out, dout>`` wrt every input). No peer runs here;
             ANCHORS.md has mamba_ssm's CUDA kernel for orientation.
  rwkv7      ``ops.rwkv7.rwkv7`` forms "reference", "xla" and the platform's kernels beside fla
             ``chunk_rwkv7``, B4 H32 K=V=64 (RWKV-7's head size), T in {2048, 8192}; fwd and
             fwd+bwd. Inputs as the RWKV-7 layer makes them: r, v, k ~ N(0, 1), kappa_hat a unit
             vector per head, a = -kappa_hat, b = kappa_hat * sigmoid(N(0, 1)) (bfloat16),
             w = -0.6065 sigmoid(N(0, 1)) float32, an N(0, 1) float32 initial state; the
             backward as KDA's (gradients wrt r, w, k, v, a, b and the initial state).
  kda-parts  (only when named in --ops) each of ``ops.kda.pallas_gpu``'s four stages timed
             alone on its real inputs (``pallas_gpu.stages``), with its own FLOP count, and
             each kernel of the intra stages alone (rows "<stage>.<kernel>", no FLOP count).

``--launch gradient_rows=4,1 state_backward=8,2`` sets the (num_warps, num_stages) of those
GPU kernels of KDA and RWKV-7 (``ops.kda.pallas_gpu.LAUNCH``, which both ops share but for an
op's own "<op>.<kernel>" entries, e.g. ``rwkv7.state_forward=8,3``) for the run, to sweep them;
every JSON records the settings it ran with ("launch"). With ``--ops kda-parts``,
``--launch-variants base gradient_rows=2,3 "chunk_outputs=8,1;wy_columns=4,1"`` times the stages
under each set of settings (on top of ``--launch``; "base" adds none) in one process, and
``--rounds 2`` repeats the variants in turn (rows "pallas_gpu [<variant>] <stage>", with " r<n>"
for the round when there are several): the same kernel moved by up to 30% between processes on
the H200 (docs/kernels.md, version 8), so variants are compared within one.

``--kernel-chunks 32,16`` also times the KDA and RWKV-7 kernels at those chunk sizes (rows
"pallas_gpu C32", ...), checked like the default rows; the nominal counts stay the C = 64 ones.
``--scan-options block_d=32,segments=8 segments=1`` likewise times the scan's "pallas_gpu"
kernel at those settings (rows "pallas_gpu block_d=32,segments=8", ...; keywords of
``ops.selective_scan.pallas_gpu.selective_scan``, called directly, as the public function
leaves them to their defaults).

How: every JAX case is compiled once (``jax.jit(...).lower(...).compile()``), called once (that
output feeds the check below), warmed up ``--warmup`` more times and timed as ``--iters``
samples of ``harness.CALLS_PER_SAMPLE`` calls dispatched back to back, host wall clock to the
last result (``harness.time_calls``: the device's time per call, without a wait on each
result); every PyTorch case is warmed up the same way, then timed call by call between two
``torch.cuda.Event``s (``benchmarks/peers.py``), which also leave the host's wait out. The
table gives the median; the JSON also gives each row's wall time, its compiles, check and
timing included (fla's first calls include its autotuning), as "row_s", for planning device
time. Inputs are fresh ``jax.random`` draws (never zeros); fla gets the very same arrays through
DLPack. ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` is set before JAX starts, so JAX and PyTorch
share the card.

Checks: before a kernel ("pallas_gpu", "pallas_tpu") case is timed it is run at the full size on
the same inputs as the "xla" form (KDA and RWKV-7: ``--check-form``, "xla" unless told;
"reference" for the decode step) and every output (forward) or every gradient (fwd+bwd) is
compared as ``rms(expected - got) / rms(expected)``. The errors go to the JSON ("check"), the
largest to the table; one above ``--tol`` (default 2e-2 for bfloat16 inputs, 5e-3 for float32)
prints "!!! CHECK FAILED" and the case is not timed. fla's outputs are compared the same way and
recorded (a mismatch is flagged but fla is still timed).

``--skip-slow`` (default on GPU) leaves out the token-by-token "reference" form above B*T = 8192
tokens (KDA: T2048 only; scan: B2 L4096 only); the table keeps a row saying so.

Counts behind TFLOP/s and GB/s (nominal: the same count for every form of one case):
  KDA, per head, forward (SPEC 3.8, chunk C = 64, d = K = V): 6*T*d^2 + 10*T*C*d + T*C^2/3;
    times B*H; fwd+bwd = 3x forward (the backward taken as 2x).
    bytes, forward: inputs read once (q, k, v, beta in their dtype; g and the initial state
    float32) + outputs written once (o, final state); fwd+bwd: inputs + cotangents (the
    outputs' size) read, gradients (the inputs' size) written.
  attention, causal: forward 2*B*H*T^2*D (half of 4*B*H*T^2*D); fwd+bwd 3.5x that.
    bytes: q, k, v read + o written; fwd+bwd: q, k, v, do read + dq, dk, dv written.
  decode: 7*B*H*K*V (decay, k^T S, rank-1 update, S^T q); bytes: q, k, v, g, beta, the state
    read, the new state and o written.
  RWKV-7: the chunkwise form's products, per head and token 8*d^2 + 18*C*d + C^2/3
    (``rwkv7_counts``); bytes as KDA's.
  scan: 7*B*L*D*N forward (exp(delta*A), the update's two multiplies and add, C*h and its
    sum); fwd+bwd 3x. bytes: u, delta, z, B, C, A, D, delta_bias read + out written; fwd+bwd
    inputs + dout read, gradients written.

Ratios: "vs base" is this row's median / the baseline's median for the same size and pass
(KDA: fla chunk_kda; decode: fla fused_recurrent_kda; scan: the "xla" form at the same dtype;
RWKV-7: fla chunk_rwkv7);
"vs attn" (KDA rows) is the median / the causal attention median at the same B, T, H and pass.
Below 1 means faster.

  # the H200: fla and einops from .whl/ (git-ignored: carry it to the machine), then the run
  pip install --no-deps --target /tmp/site .whl/fla_core-0.6.0-py3-none-any.whl \
      .whl/einops-0.8.2-py3-none-any.whl
  PYTHONPATH=/tmp/site python -m benchmarks.kernels --json kernels.json
  # or a few ops per command, to stay inside a 10-minute limit (fla autotunes on its first call
  # of each shape; the xla forms compile for tens of seconds at T=32768):
  PYTHONPATH=/tmp/site python -m benchmarks.kernels --ops kda,attention --json kda.json
  PYTHONPATH=/tmp/site python -m benchmarks.kernels --ops decode,scan --json scan.json
  # CPU: tiny sizes, no peers; pallas_gpu (interpret mode, slow) only when named:
  python -m benchmarks.kernels --smoke
  python -m benchmarks.kernels --sizes tiny --implementations reference xla pallas_gpu
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with PyTorch

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import dataclasses  # noqa: E402
import itertools  # noqa: E402
import time  # noqa: E402
from typing import Callable, Sequence  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import harness, peers  # noqa: E402
from benchmarks import selective_scan as scan_bench  # noqa: E402
from ops.kda import _prepare, kda, kda_step, pallas_gpu  # noqa: E402
from ops.rwkv7 import rwkv7  # noqa: E402
from ops.selective_scan import pallas_gpu as scan_gpu  # noqa: E402
from ops.selective_scan import selective_scan  # noqa: E402

OPS = ("kda", "attention", "decode", "scan", "rwkv7", "kda-parts")
DEFAULT_OPS = OPS[:5]  # "kda-parts" (each GPU kernel of KDA timed alone) only when asked
FORMS = ("reference", "xla", "pallas_gpu", "pallas_tpu")
FAST_FORMS = ("reference", "xla")
KERNEL_FORMS = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}  # the platform's own kernels
ATTENTION_FORMS = ("cudnn", "xla")
KDA_CHUNK = 64  # SPEC 3.8's C and ops.kda.kda's default chunk_size
SLOW_TOKENS = 8192  # --skip-slow drops "reference" above this many tokens (B*T)
TOLERANCE = {"bfloat16": 2e-2, "float32": 5e-3}
FLA_CHUNK, FLA_RECURRENT = "fla.chunk_kda", "fla.fused_recurrent_kda"
FLA_RWKV7 = "fla.chunk_rwkv7"
RWKV7_CHUNK = 64  # ops.rwkv7.rwkv7's default chunk_size
RWKV7_DECAY = -0.6065306597126334  # the layer's w = RWKV7_DECAY * sigmoid(.) (SPEC 2.3)


# ----------------------------------------------------------------------------------------- sizes

@dataclasses.dataclass(frozen=True)
class SeqSize(harness.Size):
  """KDA and attention: batch, time, heads, head dim (K = V = D)."""

  LETTERS = (("B", "batch"), ("T", "time"), ("H", "heads"), ("D", "dim"))
  batch: int
  time: int
  heads: int
  dim: int


@dataclasses.dataclass(frozen=True)
class DecodeSize(harness.Size):
  """The KDA decode step: batch, heads, head dim (K = V = D)."""

  LETTERS = (("B", "batch"), ("H", "heads"), ("D", "dim"))
  batch: int
  heads: int
  dim: int


ScanSize = scan_bench.Size

SIZES = {
    "full": dict(kda=("B4,T2048,H16,D128", "B4,T8192,H16,D128", "B4,T32768,H16,D128"),
                 decode=("B4,H16,D128", "B64,H16,D128"),
                 scan=("B2,L4096,D2048,N16", "B8,L8192,D2048,N16"),
                 rwkv7=("B4,T2048,H32,D64", "B4,T8192,H32,D64")),
    "tiny": dict(kda=("B1,T64,H2,D16",), decode=("B2,H2,D16",), scan=("B1,L64,D16,N4",),
                 rwkv7=("B1,T64,H2,D16",)),
}


# -------------------------------------------------------------------------------- FLOPs, bytes

def _itemsize(dtype) -> int:
  return jnp.dtype(dtype).itemsize


def kda_counts(s: SeqSize, dtype, backward: bool) -> tuple[float, float]:
  """(FLOPs, bytes) of KDA; see the module docstring."""
  B, T, H, d, C = s.batch, s.time, s.heads, s.dim, KDA_CHUNK
  flops = B * H * (6 * T * d * d + 10 * T * C * d + T * C * C / 3)
  n, state = B * T * H * d, B * H * d * d * 4
  inputs = 3 * n * _itemsize(dtype) + n * 4 + B * T * H * _itemsize(dtype) + state
  outputs = n * _itemsize(dtype) + state
  return (3 * flops, 2 * inputs + outputs) if backward else (flops, inputs + outputs)


def kda_stage_flops(stage: str, s: SeqSize, C: int = KDA_CHUNK) -> float:
  """Matrix-product FLOPs of one of ``ops.kda.pallas_gpu``'s four stages (docs/kernels.md):
  a whole-chunk product is 2 C^2 d, a state product 2 C d^2. The intra forward works on
  n = C / 16 sub-chunks (``ops.kda._kernel_subchunk``): per sub-chunk log2(16) levels of two
  2 S^2 d pair products and two 2 S^3 inverse steps, per pair of sub-chunks two 2 S^2 d
  products, T's off-diagonal blocks sum_{a<b} (b - a + 1) products of 2 S^3, and W, U as two
  whole C x C x d products (the chunk outputs kernel). The intra backward's three kernels
  (docs/kernels.md, version 10): the WY backward's four whole C x C x d products (dT from dW
  and dU in the dA_kk kernel, T^T dW and T^T dU in the columns kernel) and dA_kk = -T^T dT T^T
  (two C^3 products); the gradient rows' four block products per pair a < b (two as rows, two
  as columns) and per sub-chunk the level split's backward (four products and four
  inverse-sized steps a level)."""
  d = s.dim
  product, state_product = 2 * C * C * d, 2 * C * d * d
  S = min(C, 16)
  n, levels_in_sub = C // S, S.bit_length() - 1
  block, block_inverse = 2 * S * S * d, 2 * S ** 3
  sub_chunk_forward = (n * levels_in_sub * 2 * (block + block_inverse)
                       + n * (n - 1) // 2 * 2 * block
                       + sum(b - a + 1 for b in range(n) for a in range(b)) * block_inverse
                       + 2 * product)
  per_chunk = {
      "intra_forward": sub_chunk_forward,
      "state_forward": 3 * state_product + product,
      "state_backward": 6 * state_product + 2 * product,
      "intra_backward": (4 * product + 2 * 2 * C ** 3
                         + n * (n - 1) // 2 * 4 * block
                         + n * levels_in_sub * 4 * (block + block_inverse)),
  }[stage]
  return per_chunk * s.batch * s.heads * (s.time // C)


def rwkv7_counts(s: SeqSize, dtype, backward: bool) -> tuple[float, float]:
  """(FLOPs, bytes) of RWKV-7's chunkwise form, per head and token (C = 64, d = K = V): the
  four pair products 8 C d, W = T (a exp(G~)) 2 C d, T (A_ak v), A_rb X, A_rk v and A_ak v
  8 C d, W S, r S, b^T X, k^T v 8 d^2, the triangular inverse C^2 / 3; fwd+bwd 3x. Bytes as
  KDA's: r, k, v, a, b in their dtype, w and the state float32."""
  B, T, H, d, C = s.batch, s.time, s.heads, s.dim, RWKV7_CHUNK
  flops = B * H * T * (8 * d * d + 18 * C * d + C * C / 3)
  n, state = B * T * H * d, B * H * d * d * 4
  inputs = 5 * n * _itemsize(dtype) + n * 4 + state
  outputs = n * _itemsize(dtype) + state
  return (3 * flops, 2 * inputs + outputs) if backward else (flops, inputs + outputs)


def attention_counts(s: SeqSize, dtype, backward: bool) -> tuple[float, float]:
  flops = 2 * s.batch * s.heads * s.time ** 2 * s.dim
  tensor = s.batch * s.time * s.heads * s.dim * _itemsize(dtype)
  return (3.5 * flops, 7 * tensor) if backward else (flops, 4 * tensor)


def decode_counts(s: DecodeSize, dtype) -> tuple[float, float]:
  B, H, d = s.batch, s.heads, s.dim
  vectors = 4 * B * H * d * _itemsize(dtype) + B * H * d * 4 + B * H * _itemsize(dtype)
  return 7 * B * H * d * d, vectors + 2 * B * H * d * d * 4


def scan_counts(s: ScanSize, dtype, backward: bool) -> tuple[float, float]:
  B, L, D, N, G = s.batch, s.time, s.channels, s.state, max(s.groups, 1)
  flops = 7 * B * L * D * N
  size = _itemsize(dtype)
  inputs = 3 * B * L * D * size + 2 * B * L * G * N * size + D * N * 4 + 2 * D * 4
  outputs = B * L * D * size
  return (3 * flops, 2 * inputs + outputs) if backward else (flops, inputs + outputs)


# ---------------------------------------------------------------------------------------- inputs

def _output_cotangent(x, dtype):
  """An output's cotangent in the output's dtype, as the layer above hands it and as fla's side
  receives it (a float32 cotangent of a bf16 output would add a cast to every JAX
  forward+backward: 0.09 ms at KDA B4 T8192, docs/BENCHMARKS.md)."""
  return x.astype(dtype)


def kda_inputs(s: SeqSize, dtype, seed: int = 0) -> tuple[dict, tuple]:
  """(inputs of ``kda``, cotangents (do, dht)): the recipe of benchmarks/kda.py."""
  keys = jax.random.split(jax.random.key(seed), 8)
  B, T, H, d = s.batch, s.time, s.heads, s.dim
  uniform = lambda key: jax.random.uniform(key, (B, T, H, d), jnp.float32).astype(dtype)
  inputs = dict(
      q=uniform(keys[0]), k=uniform(keys[1]), v=uniform(keys[2]),
      g=jax.nn.log_sigmoid(jax.random.normal(keys[3], (B, T, H, d), jnp.float32)),
      beta=jax.nn.sigmoid(jax.random.normal(keys[4], (B, T, H), jnp.float32)).astype(dtype),
      initial_state=jax.random.normal(keys[5], (B, H, d, d), jnp.float32))
  cotangents = (_output_cotangent(jax.random.normal(keys[6], (B, T, H, d)), dtype),
                jax.random.normal(keys[7], (B, H, d, d), jnp.float32))
  return inputs, cotangents


def rwkv7_inputs(s: SeqSize, dtype, seed: int = 0) -> tuple[dict, tuple]:
  """(inputs of ``rwkv7``, cotangents (do, dht)) as the RWKV-7 layer makes them (module
  docstring)."""
  keys = jax.random.split(jax.random.key(seed), 9)
  shape = (s.batch, s.time, s.heads, s.dim)
  normal = lambda key: jax.random.normal(key, shape, jnp.float32)
  kappa = normal(keys[3])
  kappa_hat = kappa / jnp.linalg.norm(kappa, axis=-1, keepdims=True)
  inputs = dict(
      r=normal(keys[0]).astype(dtype), w=RWKV7_DECAY * jax.nn.sigmoid(normal(keys[1])),
      k=normal(keys[2]).astype(dtype), v=normal(keys[4]).astype(dtype),
      a=(-kappa_hat).astype(dtype),
      b=(kappa_hat * jax.nn.sigmoid(normal(keys[5]))).astype(dtype),
      initial_state=jax.random.normal(keys[6], (s.batch, s.heads, s.dim, s.dim), jnp.float32))
  cotangents = (_output_cotangent(normal(keys[7]), dtype),
                jax.random.normal(keys[8], (s.batch, s.heads, s.dim, s.dim), jnp.float32))
  return inputs, cotangents


def attention_inputs(s: SeqSize, dtype, seed: int = 0) -> tuple[dict, jax.Array]:
  keys = jax.random.split(jax.random.key(seed), 4)
  shape = (s.batch, s.time, s.heads, s.dim)
  normal = lambda key: jax.random.normal(key, shape, jnp.float32).astype(dtype)
  return dict(q=normal(keys[0]), k=normal(keys[1]), v=normal(keys[2])), _output_cotangent(
      jax.random.normal(keys[3], shape, jnp.float32), dtype)


def decode_inputs(s: DecodeSize, dtype, seed: int = 0) -> dict:
  """One token of ``kda_step`` by the KDA recipe, and an N(0, 1) float32 state."""
  keys = jax.random.split(jax.random.key(seed), 6)
  B, H, d = s.batch, s.heads, s.dim
  uniform = lambda key: jax.random.uniform(key, (B, H, d), jnp.float32).astype(dtype)
  return dict(q=uniform(keys[0]), k=uniform(keys[1]), v=uniform(keys[2]),
              g=jax.nn.log_sigmoid(jax.random.normal(keys[3], (B, H, d), jnp.float32)),
              beta=jax.nn.sigmoid(jax.random.normal(keys[4], (B, H), jnp.float32)).astype(dtype),
              state=jax.random.normal(keys[5], (B, H, d, d), jnp.float32))


def scan_inputs(s: ScanSize, dtype, seed: int = 0) -> tuple[dict, jax.Array]:
  """(inputs of ``selective_scan``, dout): the recipe of benchmarks/selective_scan.py."""
  keys = jax.random.split(jax.random.key(seed), 8)
  B, L, D, N = s.batch, s.time, s.channels, s.state
  bc_shape = (B, L, s.groups, N) if s.groups else (B, L, N)
  normal = lambda key, shape: jax.random.normal(key, shape, jnp.float32).astype(dtype)
  dt = jnp.exp(jax.random.uniform(keys[6], (D,), jnp.float32, jnp.log(1e-3), jnp.log(1e-1)))
  inputs = dict(
      u=normal(keys[0], (B, L, D)), delta=normal(keys[1], (B, L, D)) * 0.1,
      A=-jnp.tile(jnp.arange(1, N + 1, dtype=jnp.float32), (D, 1)),
      B=normal(keys[2], bc_shape), C=normal(keys[3], bc_shape), D=jnp.ones((D,), jnp.float32),
      z=normal(keys[4], (B, L, D)), delta_bias=dt + jnp.log(-jnp.expm1(-dt)))
  return inputs, _output_cotangent(jax.random.normal(keys[5], (B, L, D)), dtype)


# ------------------------------------------------------------------------------ the functions

def kda_fn(form: str, backward: bool, chunk_size: int = KDA_CHUNK) -> Callable:
  def forward(inputs, cotangents=None):
    del cotangents
    return kda(**inputs, return_final_state=True, use_qk_l2norm_in_kernel=True,
               implementation=form, chunk_size=chunk_size)
  return harness.with_backward(forward) if backward else forward


def rwkv7_fn(form: str, backward: bool, chunk_size: int = RWKV7_CHUNK) -> Callable:
  def forward(inputs, cotangents=None):
    del cotangents
    return rwkv7(**inputs, return_final_state=True, implementation=form, chunk_size=chunk_size)
  return harness.with_backward(forward) if backward else forward


def attention_fn(form: str, backward: bool) -> Callable:
  def forward(inputs, cotangent=None):
    del cotangent
    return jax.nn.dot_product_attention(inputs["q"], inputs["k"], inputs["v"], is_causal=True,
                                        implementation=form)
  return harness.with_backward(forward) if backward else forward


def decode_fn(form: str, backward: bool = False) -> Callable:
  del backward

  def step(inputs, cotangents=None):
    del cotangents
    return kda_step(**inputs, use_qk_l2norm_in_kernel=True, implementation=form)
  return step


SCAN_OPTIONS = ("block_d", "segments", "chunk", "prefetch_state_tokens", "num_warps_forward",
                "num_warps_backward")


def scan_options(text: str) -> dict[str, int]:
  """``"block_d=32,segments=8"`` -> {"block_d": 32, "segments": 8}, keywords of SCAN_OPTIONS."""
  options = {}
  for item in text.split(","):
    name, _, value = item.partition("=")
    if name not in SCAN_OPTIONS or not value.isdigit():
      raise ValueError(f"scan option {item!r}: expected NAME=INTEGER with NAME one of "
                       f"{', '.join(SCAN_OPTIONS)}")
    options[name] = int(value)
  return options


def _scan_options_text(text: str) -> str:
  """``--scan-options``' type: the text, once ``scan_options`` has read it."""
  try:
    scan_options(text)
  except ValueError as error:
    raise argparse.ArgumentTypeError(str(error)) from error
  return text


def scan_fn(form: str, backward: bool, options: str | None = None) -> Callable:
  """``selective_scan`` in ``form``; with ``options`` (``scan_options``), the "pallas_gpu"
  kernel called directly with those settings (the public function has no such arguments)."""
  settings = None if options is None else scan_options(options)

  def forward(inputs, cotangent=None):
    del cotangent
    if settings is None:
      return selective_scan(**inputs, delta_softplus=True, implementation=form)
    if form != "pallas_gpu":
      raise ValueError(f"scan options apply to the pallas_gpu kernel only, not {form!r}")
    B, C = inputs["B"], inputs["C"]
    if B.ndim == 3:  # [batch, time, state]: one group
      B, C = B[:, :, None], C[:, :, None]
    out, _ = scan_gpu.selective_scan(inputs["u"], inputs["delta"], inputs["A"], B, C, inputs["D"],
                                     inputs["z"], inputs["delta_bias"], True, None, None,
                                     **settings)
    return out
  return harness.with_backward(forward) if backward else forward


# ------------------------------------------------------------------------------ JAX mechanics

def _leaves(tree, names: Sequence[str] | None = None, prefix: str = "") -> dict:
  """Output leaves by name: ``names`` for a tuple, dict keys otherwise (with ``prefix``)."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  if names is not None and len(names) == len(flat):
    return {prefix + n: x for n, (_, x) in zip(names, flat)}
  return {prefix + jax.tree_util.keystr(p).strip("[]'\"").replace("']['", "."): x
          for p, x in flat}


@jax.jit
def _rel_rms(expected, got):
  expected = expected.astype(jnp.float32)
  diff = expected - got.astype(jnp.float32)
  num, den = jnp.sqrt(jnp.mean(diff * diff)), jnp.sqrt(jnp.mean(expected * expected))
  return jnp.where(den > 0, num / den, num)


def compare(expected: dict, got: dict) -> dict:
  """{name: rms(expected - got) / rms(expected)} over the names both have."""
  return {name: float(_rel_rms(expected[name], got[name])) for name in expected if name in got}


def run_once(fn: Callable, args: tuple):
  """Compiles ``fn`` for ``args`` and calls it once: (compiled, compile seconds, output)."""
  compiled, compile_s = harness.compile_fn(fn, args)
  return compiled, compile_s, jax.block_until_ready(compiled(*args))


def _short(error: BaseException, limit: int = 90) -> str:
  text = " ".join(f"{type(error).__name__}: {error}".split())
  return text if len(text) <= limit else text[:limit - 3] + "..."


# ----------------------------------------------------------------------------------- the table

def _num(value, fmt: str = ".3g") -> str:
  return "-" if value is None else format(value, fmt)


TABLE = harness.Table((
    harness.Column("op", 9, lambda r: r["op"]),
    harness.Column("size", 22, lambda r: r["size"]),
    harness.Column("dtype", 8, lambda r: r["dtype"]),
    harness.Column("implementation", 23, lambda r: r["implementation"]),
    harness.Column("pass", 7, lambda r: r["pass"]),
    harness.Column("median ms", 10, lambda r: _num(r["median_ms"], ".3f")),
    harness.Column("vs base", 7, lambda r: _num(r.get("ratio"), ".2f")),
    harness.Column("vs attn", 7, lambda r: _num(r.get("ratio_attention"), ".2f")),
    harness.Column("TFLOP/s", 8, lambda r: _num(r.get("tflops"))),
    harness.Column("GB/s", 8, lambda r: _num(r.get("gbps"))),
    harness.Column("check", 8, lambda r: _num(r.get("check_max"), ".1e")),
    harness.Column("", 0, lambda r: "" if r["status"] == "ok" else " " + r["status"]),
))


class Bench:
  """Holds the run's options and records; ``emit`` finishes, prints and saves a record."""

  def __init__(self, args: argparse.Namespace):
    self.args = args
    self.records: list[dict] = []
    self.failures: list[dict] = []
    self.meta = dict(mode="kernels", warmup=args.warmup, iters=args.iters,
                     skip_slow=args.skip_slow, slow_tokens=SLOW_TOKENS,
                     tolerance=args.tol if args.tol is not None else TOLERANCE,
                     kda_chunk=KDA_CHUNK, launch=dict(pallas_gpu.LAUNCH),
                     **peers.versions())

  def record(self, op: str, size, dtype, implementation: str, pass_name: str,
             counts: tuple[float, float], **shape) -> dict:
    flops, nbytes = counts
    return {"op": op, "size": str(size), "dtype": jnp.dtype(dtype).name,
            "implementation": implementation, "pass": pass_name, **shape, "flops": flops,
            "bytes": nbytes, "status": "ok", "median_ms": None, "_started": time.perf_counter()}

  def emit(self, record: dict) -> None:
    record["row_s"] = time.perf_counter() - record.pop("_started")
    if record["median_ms"] is not None:
      seconds = record["median_ms"] / 1e3
      if record["flops"] is not None:
        record["tflops"] = record["flops"] / seconds / 1e12
      record["gbps"] = record["bytes"] / seconds / 1e9
    elif record["status"] == "ok":
      record["status"] = "not timed"
    self.records.append(record)
    print(TABLE.row(record), flush=True)
    harness.write_json(self.args.json, self.records, **self.meta)

  def check_form(self, op: str) -> str:
    """The JAX form an op's kernels and peers are checked against."""
    return "reference" if op == "decode" else self.args.check_form

  def tolerance(self, dtype) -> float:
    return self.args.tol if self.args.tol is not None else TOLERANCE[jnp.dtype(dtype).name]

  def slow(self, form: str, tokens: int) -> str | None:
    if form == "reference" and self.args.skip_slow and tokens > SLOW_TOKENS:
      return f"skipped: --skip-slow (reference above B*T = {SLOW_TOKENS} tokens)"
    return None

  def jax_forms(self, make_record: Callable, make_fn: Callable, args: tuple, dtype,
                passes: Sequence[str], tokens: int, check_form: str,
                names: dict[str, Sequence[str] | None],
                variants: tuple[str, str, Sequence[int]] | None = None) -> dict:
    """Times every ``--implementations`` form (``make_fn(form, backward)``) on ``args``, checking
    the kernels against ``check_form`` first; returns ``check_form``'s outputs by pass (named
    leaves), for checking the peers. ``variants = (keyword, label, values)``: the kernels also
    run at each value of one keyword argument (``make_fn(form, backward, keyword=value)``), as
    form "<form> <label><value>" (``--kernel-chunks``, ``--scan-options``)."""
    expected: dict[str, dict] = {}
    forms = [(f, None) for f in FORMS  # in this order, so "xla" is run (and kept) first
             if f in self.args.implementations and (f != "xla" or check_form == "xla")]
    keyword, label, values = variants or (None, None, ())
    forms += [(f, v) for f, _ in forms if f in KERNEL_FORMS.values() for v in values]

    def named(out, pass_name):
      return _leaves(out, names.get(pass_name), prefix="d" if pass_name == "fwd+bwd" else "")

    for form, value in forms:
      for pass_name in passes:
        backward = pass_name == "fwd+bwd"
        rec = make_record(form if value is None else f"{form} {label}{value}", pass_name)
        reason = self.slow(form, tokens)
        if reason:
          rec["status"] = reason
          self.emit(rec)
          continue
        fn = (make_fn(form, backward) if value is None
              else make_fn(form, backward, **{keyword: value}))
        try:
          compiled, compile_s, out = run_once(fn, args)
        except Exception as error:  # noqa: BLE001 - a missing form or a failed compile: a row
          rec["status"] = f"n/a ({_short(error)})"
          rec["error"] = f"{type(error).__name__}: {error}"
          self.emit(rec)
          continue
        rec["compile_s"] = compile_s
        rec["temp_bytes"] = harness.memory_bytes(compiled)["temp_bytes"]
        if form == check_form:
          expected[pass_name] = named(out, pass_name)
        elif form in KERNEL_FORMS.values():
          if pass_name not in expected:
            try:
              reference_out = run_once(make_fn(check_form, pass_name == "fwd+bwd"), args)[2]
              expected[pass_name] = named(reference_out, pass_name)
            except Exception as error:  # noqa: BLE001
              rec["status"] = f"check impossible ({_short(error)}); not timed"
              self.failures.append(rec)
              self.emit(rec)
              continue
          if not self.check(rec, expected[pass_name], named(out, pass_name), check_form, dtype):
            del out, compiled
            self.emit(rec)
            continue
        del out
        rec.update(harness.time_calls(compiled, args, self.args.warmup, self.args.iters))
        self.emit(rec)
    return expected

  def check(self, rec: dict, expected: dict, got: dict, against: str, dtype,
            gate: bool = True) -> bool:
    """Records the relative RMS errors of ``got``; False (loudly) when one exceeds the tolerance."""
    errors = compare(expected, got)
    tol = self.tolerance(dtype)
    rec.update(check=errors, check_against=against, check_tol=tol,
               check_max=max(errors.values(), default=None))
    bad = {n: e for n, e in errors.items() if not e <= tol}  # NaN fails too
    if not errors or bad:
      words = ", ".join(f"{n} {e:.2e}" for n, e in bad.items()) or "no outputs to compare"
      if gate:
        rec["status"] = f"CHECK FAILED vs {against} ({words} > {tol:g}): not timed"
        print(f"!!! CHECK FAILED: {rec['op']} {rec['size']} {rec['implementation']} "
              f"{rec['pass']}: {words} (tolerance {tol:g})", flush=True)
      else:
        rec["status"] = f"ok, but differs from {against}: {words} > {tol:g}"
      self.failures.append(rec)
      return False
    return True

  def peer(self, rec: dict, build: Callable, expected: dict | None, names_prefix: str,
           dtype) -> None:
    """Runs a PyTorch case: ``build() -> (fn, names)``; checks (not gating) and times it."""
    reason = peers.unavailable()
    if reason:
      rec["status"] = f"n/a ({reason})"
      self.emit(rec)
      return
    try:
      fn, names = build()
      out = fn()
      if expected:
        got = {names_prefix + n: x for n, x in zip(names, out)}
        errors = {n: peers.rel_rms(expected[n], got[n]) for n in expected if n in got}
        tol = self.tolerance(dtype)
        rec.update(check=errors, check_against=self.check_form(rec["op"]),
                   check_tol=tol, check_max=max(errors.values(), default=None))
        bad = {n: e for n, e in errors.items() if not e <= tol}
        if bad:
          rec["status"] = ("ok, but differs from " + rec["check_against"] + ": "
                           + ", ".join(f"{n} {e:.2e}" for n, e in bad.items()))
          self.failures.append(rec)
      del out
      rec.update(peers.time_cuda(fn, self.args.warmup, self.args.iters))
    except Exception as error:  # noqa: BLE001 - a peer failing is a row, not the end of the run
      rec["status"] = f"error ({_short(error)})"
      rec["error"] = f"{type(error).__name__}: {error}"
    finally:
      if not peers.unavailable():
        peers.release()
    self.emit(rec)


# ----------------------------------------------------------------------------------- the ops

STATE_OUTPUTS = {"fwd": ("o", "final_state"), "fwd+bwd": None}


def _run_chunked(bench: Bench, op: str, size: SeqSize, make_inputs: Callable, counts: Callable,
                 make_fn: Callable, fla_name: str, fla_chunk: Callable) -> tuple:
  """A chunkwise op at one size: its JAX forms (checked against ``--check-form``) and fla's
  chunk kernel, bf16 inputs, fwd and fwd+bwd. Returns ``(make_record, inputs, expected
  outputs by pass)`` for the op's further rows."""
  dtype = jnp.bfloat16
  inputs, cotangents = make_inputs(size, dtype)
  shape = dict(batch=size.batch, time=size.time, heads=size.heads, dim=size.dim)
  make_record = lambda impl, p: bench.record(op, size, dtype, impl, p,
                                             counts(size, dtype, p == "fwd+bwd"), **shape)
  expected = bench.jax_forms(make_record, make_fn, (inputs, cotangents), dtype, harness.PASSES,
                             size.batch * size.time, bench.check_form(op), STATE_OUTPUTS,
                             variants=("chunk_size", "C", bench.args.kernel_chunks))
  for pass_name in harness.PASSES:
    backward = pass_name == "fwd+bwd"
    bench.peer(make_record(fla_name, pass_name),
               lambda: fla_chunk(inputs, cotangents, backward),
               expected.get(pass_name), "d" if backward else "", dtype)
  return make_record, inputs, expected


def run_kda(bench: Bench, sizes: Sequence[SeqSize]) -> None:
  for size in sizes:
    make_record, inputs, expected = _run_chunked(bench, "kda", size, kda_inputs, kda_counts,
                                                 kda_fn, FLA_CHUNK, peers.kda_chunk)
    bench.peer(make_record(FLA_RECURRENT, "fwd"), lambda: peers.kda_fused_recurrent(inputs),
               expected.get("fwd"), "", jnp.bfloat16)
    rec = make_record(FLA_RECURRENT, "fwd+bwd")
    rec["status"] = "n/a (fla's fused_recurrent_kda has no backward)"
    bench.emit(rec)
    del inputs, expected


def run_rwkv7(bench: Bench, sizes: Sequence[SeqSize]) -> None:
  for size in sizes:
    _run_chunked(bench, "rwkv7", size, rwkv7_inputs, rwkv7_counts, rwkv7_fn, FLA_RWKV7,
                 peers.rwkv7_chunk)


def run_attention(bench: Bench, sizes: Sequence[SeqSize]) -> None:
  dtype = jnp.bfloat16
  for size in sizes:
    inputs, cotangent = attention_inputs(size, dtype)
    shape = dict(batch=size.batch, time=size.time, heads=size.heads, dim=size.dim)
    for form in bench.args.attention:
      for pass_name in harness.PASSES:
        backward = pass_name == "fwd+bwd"
        rec = bench.record("attention", size, dtype, form, pass_name,
                           attention_counts(size, dtype, backward), **shape)
        try:
          compiled, compile_s, out = run_once(attention_fn(form, backward), (inputs, cotangent))
          del out
          rec.update(compile_s=compile_s, temp_bytes=harness.memory_bytes(compiled)["temp_bytes"])
          rec.update(harness.time_calls(compiled, (inputs, cotangent), bench.args.warmup,
                                   bench.args.iters))
        except Exception as error:  # noqa: BLE001 - e.g. no cuDNN on this platform
          rec["status"] = f"n/a ({_short(error)})"
          rec["error"] = f"{type(error).__name__}: {error}"
        bench.emit(rec)
    del inputs, cotangent


def run_decode(bench: Bench, sizes: Sequence[DecodeSize]) -> None:
  dtype = jnp.bfloat16
  for size in sizes:
    inputs = decode_inputs(size, dtype)
    shape = dict(batch=size.batch, heads=size.heads, dim=size.dim)
    make_record = lambda impl, p: bench.record("decode", size, dtype, impl, p,
                                               decode_counts(size, dtype), **shape)
    expected = bench.jax_forms(make_record, decode_fn, (inputs,), dtype, ("step",), 0,
                               "reference", {"step": ("o", "state")})
    bench.peer(make_record(FLA_RECURRENT, "step"),
               lambda: peers.kda_fused_recurrent(inputs, add_time_axis=True),
               expected.get("step"), "", dtype)
    del inputs, expected


def run_scan(bench: Bench, sizes: Sequence[ScanSize]) -> None:
  for size in sizes:
    for dtype in map(jnp.dtype, bench.args.scan_dtypes):
      inputs, cotangent = scan_inputs(size, dtype)
      make_record = lambda impl, p: bench.record(
          "scan", size, dtype, impl, p, scan_counts(size, dtype, p == "fwd+bwd"))
      bench.jax_forms(make_record, scan_fn, (inputs, cotangent), dtype, bench.args.scan_passes,
                      size.batch * size.time, "xla", {"fwd": ("out",), "fwd+bwd": None},
                      variants=("options", "", bench.args.scan_options))
      del inputs, cotangent


def run_kda_parts(bench: Bench, sizes: Sequence[SeqSize]) -> None:
  """Each of the GPU KDA stages and intra kernels timed alone (``ops.kda.pallas_gpu.stages``),
  bf16 inputs, at the default chunk and each ``--kernel-chunks`` size, under each
  ``--launch-variants`` setting (in turn, ``--rounds`` times); bytes are the stage's arguments
  and outputs (FLOPs the C = 64 counts, stages only)."""
  dtype = jnp.bfloat16
  variants = bench.args.launch_variants or [(None, ())]
  rounds = bench.args.rounds
  for size in sizes:
    inputs, _ = kda_inputs(size, dtype)
    shape = dict(batch=size.batch, time=size.time, heads=size.heads, dim=size.dim)
    prepared = _prepare(inputs["q"], inputs["k"], inputs["v"], inputs["g"], inputs["beta"],
                        size.heads, size.heads, size.dim, None, True, for_kernel=True)
    for round_index, (label, settings), chunk_size in itertools.product(
        range(rounds), variants, [None] + bench.args.kernel_chunks):
      form = " ".join(filter(None, ["pallas_gpu", chunk_size and f"C{chunk_size}",
                                    label and f"[{label}]"]))
      suffix = f" r{round_index + 1}" if rounds > 1 else ""
      # The stage rows trace their kernels (reading LAUNCH) when first called: time inside.
      with launch_variant(settings):
        for name, fn, args in pallas_gpu.stages(*prepared, inputs["initial_state"],
                                                scale=size.dim ** -0.5,
                                                chunk_size=chunk_size or 64,
                                                l2_normalize_qk=True):
          out = jax.block_until_ready(fn(*args))
          nbytes = sum(x.nbytes for x in jax.tree.leaves((args, out)))
          flops = kda_stage_flops(name, size) if "." not in name else None  # stages only
          rec = bench.record("kda-parts", size, dtype, f"{form} {name}{suffix}",
                             "bwd" if "backward" in name else "fwd", (flops, nbytes), **shape)
          rec.update(harness.time_calls(fn, args, bench.args.warmup, bench.args.iters))
          if label:
            rec.update(launch_variant=label, round=round_index + 1)
          bench.emit(rec)
    del inputs, prepared


def _timed(records, **match):
  return [r for r in records if r["median_ms"] is not None
          and all(r.get(k) == v for k, v in match.items())]


def add_ratios(records: list[dict]) -> None:
  """Sets "ratio" (vs the op's baseline) and, on KDA rows, "ratio_attention"."""
  for r in _timed(records):
    same = dict(op=r["op"], size=r["size"], dtype=r["dtype"], **{"pass": r["pass"]})
    base = {"kda": FLA_CHUNK, "decode": FLA_RECURRENT, "scan": "xla",
            "rwkv7": FLA_RWKV7}.get(r["op"])
    found = _timed(records, **same, implementation=base) if base else []
    if found:
      r["ratio"], r["ratio_base"] = r["median_ms"] / found[0]["median_ms"], base
    if r["op"] == "kda":
      attention = sorted(_timed(records, op="attention", batch=r["batch"], time=r["time"],
                                heads=r["heads"], **{"pass": r["pass"]}),
                         key=lambda a: ATTENTION_FORMS.index(a["implementation"]))
      if attention:
        r["ratio_attention"] = r["median_ms"] / attention[0]["median_ms"]
        r["ratio_attention_base"] = attention[0]["implementation"]


# ---------------------------------------------------------------------------------------- CLI

def _ints(text: str) -> list[int]:
  return [int(c) for c in text.split(",")]


def _launch_setting(text: str) -> tuple[str, tuple[int, int]]:
  """``NAME=WARPS,STAGES`` as (name, (num_warps, num_stages)); the name is checked by
  ``parse_args``."""
  name, _, value = text.partition("=")
  try:
    numbers = _ints(value)
  except ValueError:
    numbers = []
  if len(numbers) != 2 or min(numbers) < 1:
    raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=WARPS,STAGES, e.g. "
                                     "gradient_rows=4,1")
  return name.strip(), tuple(numbers)


def _launch_variant(text: str) -> tuple[str, tuple]:
  """``base`` or ``NAME=WARPS,STAGES[;NAME=WARPS,STAGES...]`` as (the text, its settings)."""
  text = text.strip()
  if text == "base":
    return text, ()
  return text, tuple(_launch_setting(part) for part in text.split(";") if part.strip())


def apply_launch(settings: Sequence[tuple[str, tuple[int, int]]]) -> None:
  """Sets the GPU kernels' launch settings (``ops.kda.pallas_gpu.LAUNCH``) for this process."""
  pallas_gpu.LAUNCH.update(settings)


@contextlib.contextmanager
def launch_variant(settings: Sequence[tuple[str, tuple[int, int]]]):
  """``settings`` applied over the process's launch settings inside the block only."""
  before = dict(pallas_gpu.LAUNCH)
  apply_launch(settings)
  try:
    yield
  finally:
    pallas_gpu.LAUNCH.clear()
    pallas_gpu.LAUNCH.update(before)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--ops", default=",".join(DEFAULT_OPS),
                      help=f"comma-separated subset of {','.join(OPS)} (default "
                      f"{','.join(DEFAULT_OPS)})")
  parser.add_argument("--sizes", choices=tuple(SIZES), default=None,
                      help="size set: full (default on GPU) or tiny (default elsewhere)")
  parser.add_argument("--kda-sizes", nargs="+", type=SeqSize.parse,
                      help="KDA and attention sizes like B4,T8192,H16,D128 (overrides --sizes)")
  parser.add_argument("--decode-sizes", nargs="+", type=DecodeSize.parse,
                      help="decode sizes like B64,H16,D128")
  parser.add_argument("--scan-sizes", nargs="+", type=ScanSize.parse,
                      help="scan sizes like B2,L4096,D2048,N16")
  parser.add_argument("--rwkv7-sizes", nargs="+", type=SeqSize.parse,
                      help="RWKV-7 sizes like B4,T8192,H32,D64")
  parser.add_argument("--launch", nargs="+", type=_launch_setting, default=[],
                      metavar="NAME=WARPS,STAGES",
                      help="KDA and RWKV-7 GPU kernels: launch settings for this run, of "
                      f"{', '.join(pallas_gpu.LAUNCH)}")
  parser.add_argument("--launch-variants", nargs="+", type=_launch_variant, default=None,
                      metavar="VARIANT",
                      help="kda-parts: time the stages under each variant in one process: "
                      "'base' or NAME=WARPS,STAGES[;NAME=WARPS,STAGES...], over --launch")
  parser.add_argument("--rounds", type=int, default=1,
                      help="kda-parts: time every launch variant this many times, in turn")
  parser.add_argument("--kernel-chunks", type=_ints, default=[],
                      help="KDA and RWKV-7: also time the kernels at these chunk sizes "
                      "(comma-separated; rows '<form> C<size>'), beside the default 64")
  parser.add_argument("--scan-options", nargs="+", default=[], type=_scan_options_text,
                      help="scan: also time the pallas_gpu kernel at each of these settings, "
                      f"NAME=INTEGER[,NAME=INTEGER...] with NAME in {', '.join(SCAN_OPTIONS)} "
                      "(rows 'pallas_gpu <settings>'), beside its defaults")
  parser.add_argument("--scan-passes", nargs="+", choices=harness.PASSES, default=harness.PASSES,
                      help="the scan's passes (a settings sweep of the forward: fwd)")
  parser.add_argument("--scan-dtypes", nargs="+", choices=("float32", "bfloat16"),
                      default=["float32", "bfloat16"], help="dtypes of the scan's activations")
  parser.add_argument("--implementations", nargs="+", choices=FORMS, default=None,
                      help="JAX forms (default: reference, xla and the platform's kernels on a "
                      "GPU or TPU; reference and xla elsewhere, where the kernels would run in "
                      "interpret mode)")
  parser.add_argument("--attention", nargs="+", choices=ATTENTION_FORMS, default=None,
                      help="attention implementations (default: cudnn on GPU, xla elsewhere)")
  parser.add_argument("--skip-slow", action=argparse.BooleanOptionalAction, default=None,
                      help=f"leave out reference above B*T = {SLOW_TOKENS} (default: on GPU)")
  parser.add_argument("--check-form", choices=FAST_FORMS, default="xla",
                      help='the form the KDA and RWKV-7 kernels and fla are checked against: '
                      '"reference" skips compiling "xla"\'s fwd+bwd (2 min 11 s for RWKV-7 at '
                      'B4 T2048 on the H200); default xla')
  parser.add_argument("--tol", type=float, default=None,
                      help="relative RMS error a checked case must stay under (default 2e-2 "
                      "for bfloat16 inputs, 5e-3 for float32)")
  parser.add_argument("--warmup", type=int, default=None, help="default 3 (GPU), 1 (elsewhere)")
  parser.add_argument("--iters", type=int, default=None, help="default 20 (GPU), 3 (elsewhere)")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny sizes, reference and xla only, one call each: a quick check "
                      "that the script runs")
  parser.add_argument("--json", metavar="PATH", help="write the records as JSON (after each row)")
  parser.add_argument("--table", metavar="PATH",
                      help="measure nothing: print the table, ratios included, of the records "
                           "in a JSON that a run wrote (one cut short included)")
  args = parser.parse_args(argv)

  gpu = jax.default_backend() == "gpu"
  args.ops = [op.strip() for op in args.ops.split(",") if op.strip()]
  if unknown := set(args.ops) - set(OPS):
    parser.error(f"--ops: unknown {sorted(unknown)}; choose from {','.join(OPS)}")
  for flag, settings in [("--launch", args.launch)] + [
      ("--launch-variants", settings) for _, settings in args.launch_variants or []]:
    if unknown := {name for name, _ in settings} - set(pallas_gpu.LAUNCH):
      parser.error(f"{flag}: unknown kernels {sorted(unknown)}; choose from "
                   f"{', '.join(pallas_gpu.LAUNCH)}")
  if args.rounds < 1:
    parser.error(f"--rounds must be at least 1, got {args.rounds}")
  sizes = SIZES[args.sizes or ("tiny" if args.smoke or not gpu else "full")]
  args.kda_sizes = args.kda_sizes or [SeqSize.parse(s) for s in sizes["kda"]]
  args.decode_sizes = args.decode_sizes or [DecodeSize.parse(s) for s in sizes["decode"]]
  args.scan_sizes = args.scan_sizes or [ScanSize.parse(s) for s in sizes["scan"]]
  args.rwkv7_sizes = args.rwkv7_sizes or [SeqSize.parse(s) for s in sizes["rwkv7"]]
  if args.implementations is None:
    kernels = KERNEL_FORMS.get(jax.default_backend())
    args.implementations = list(FAST_FORMS) + ([kernels] if kernels and not args.smoke else [])
  if args.attention is None:
    args.attention = ["cudnn" if gpu else "xla"]
  if args.skip_slow is None:
    args.skip_slow = gpu
  if args.warmup is None:
    args.warmup = 0 if args.smoke else 3 if gpu else 1
  if args.iters is None:
    args.iters = 1 if args.smoke else 20 if gpu else 3
  return args


def print_table(records: list[dict]) -> None:
  """The table of ``records`` with their ratios (added in place)."""
  add_ratios(records)
  print(TABLE.header())
  for record in records:
    print(TABLE.row(record))


def main(argv: Sequence[str] | None = None) -> list[dict]:
  args = parse_args(argv)
  if args.table:
    with open(args.table) as f:
      saved = json.load(f)
    print(f"# {args.table}: {saved.get('device_kind', '?')}, jax {saved.get('jax_version', '?')}, "
          f"median of {saved.get('iters')} calls after {saved.get('warmup')} warm-up")
    print_table(saved["records"])
    return saved["records"]
  apply_launch(args.launch)
  bench = Bench(args)
  device = jax.devices()[0]
  peer_state = peers.unavailable() or ", ".join(f"{k} {v}" for k, v in peers.versions().items())
  print(f"# kernels on {device.platform} ({device.device_kind}), jax {jax.__version__}; "
        f"peers: {peer_state}")
  print(f"# JAX: median of {args.iters} samples of {harness.CALLS_PER_SAMPLE} calls dispatched "
        f"back to back, after {args.warmup} warm-up; PyTorch: {args.iters} calls each between CUDA "
        f"events. forms: {' '.join(args.implementations)}; "
        f"skip-slow {'on' if args.skip_slow else 'off'}")
  print("# vs base: median / baseline's (kda: fla.chunk_kda, decode: fla.fused_recurrent_kda, "
        "scan: xla, rwkv7: fla.chunk_rwkv7); vs attn: / causal attention's; check: max relative "
        f"RMS error vs {args.check_form} (scan: xla, decode: reference)")
  print(TABLE.header(), flush=True)
  runners = dict(kda=(run_kda, args.kda_sizes), attention=(run_attention, args.kda_sizes),
                 decode=(run_decode, args.decode_sizes), scan=(run_scan, args.scan_sizes),
                 rwkv7=(run_rwkv7, args.rwkv7_sizes))
  runners["kda-parts"] = (run_kda_parts, args.kda_sizes)
  for op in OPS:
    if op in args.ops:
      runner, sizes = runners[op]
      runner(bench, sizes)
  print("\n# all rows, with ratios")
  print_table(bench.records)
  if bench.failures:
    print(f"\n!!! {len(bench.failures)} check(s) failed or differ:")
    for record in bench.failures:
      print(f"!!!   {record['op']} {record['size']} {record['dtype']} "
            f"{record['implementation']} {record['pass']}: {record['status']}")
  harness.write_json(args.json, bench.records, **bench.meta)
  return bench.records


if __name__ == "__main__":
  main()
