"""Text generation: prefill a prompt, then decode token by token with the recurrent state.

    python -m train.generate --config configs/mamba_tiny.py --sample.prompt="def " \\
        --sample.temperature=0.8 --sample.top_k=40 --sample.seed=1

loads the latest checkpoint under ``train.workdir`` and prints the continuation.
"""

from __future__ import annotations

import codecs
import functools
import sys
import time
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from models.lm import CACHED_MIXERS, LanguageModel, decode_state_bytes, layer_letters


def sample_token(logits: jax.Array, key: jax.Array, temperature: float, top_k: int,
                 top_p: float) -> jax.Array:
  """Draws one token per row of logits [batch, vocab]; temperature 0 is greedy.

  ``top_k`` > 0 keeps the k most likely tokens; ``top_p`` < 1 keeps the smallest set whose
  probability reaches top_p. Returns int32 [batch].
  """
  if temperature < 0 or top_k < 0 or not 0.0 < top_p <= 1.0:
    raise ValueError(f"expected temperature >= 0, top_k >= 0 and 0 < top_p <= 1, got "
                     f"temperature={temperature}, top_k={top_k}, top_p={top_p}")
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # The threshold is the smallest logit whose preceding mass is still below top_p.
    keep = (cumulative - jax.nn.softmax(sorted_logits, axis=-1)) < top_p
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.lru_cache(maxsize=8)
def make_decoder(model: LanguageModel, sample_cfg) -> tuple[Callable, Callable]:
  """Jitted (prefill, step) functions.

  prefill(params, tokens [batch, time], key) -> (next token [batch], state); the head runs on
    the last position only
  step(params, token [batch], state, key) -> (next token [batch], state)
  """
  draw = lambda logits, key: sample_token(logits, key, sample_cfg.temperature, sample_cfg.top_k,
                                          sample_cfg.top_p)

  @jax.jit
  def prefill(params, tokens, key):
    logits, state = model.apply({"params": params}, tokens, last_only=True)
    return draw(logits[:, -1], key), state

  @jax.jit
  def step(params, token, state, key):
    logits, state = model.apply({"params": params}, token[:, None], state=state)
    return draw(logits[:, -1], key), state

  return prefill, step


def generate(model: LanguageModel, params, prompt: bytes, sample_cfg) -> Iterator[int]:
  """Yields ``sample_cfg.max_new_tokens`` byte values continuing ``prompt``."""
  if not prompt:
    raise ValueError("prompt must hold at least one byte")
  cached = CACHED_MIXERS & set(layer_letters(model.config))
  if cached and len(prompt) + sample_cfg.max_new_tokens > model.config.max_cache_length:
    raise ValueError(f"a prompt of {len(prompt)} bytes plus max_new_tokens="
                     f"{sample_cfg.max_new_tokens} does not fit the attention cache of "
                     f"max_cache_length={model.config.max_cache_length} tokens; raise "
                     "--model.max_cache_length or shorten the sample")
  prefill, step = make_decoder(model, sample_cfg)
  keys = jax.random.split(jax.random.key(sample_cfg.seed), sample_cfg.max_new_tokens)
  tokens = jnp.asarray(np.frombuffer(prompt, np.uint8).astype(np.int32))[None]
  token, state = prefill(params, tokens, keys[0])
  for i in range(sample_cfg.max_new_tokens):
    yield int(token[0])
    if i + 1 < sample_cfg.max_new_tokens:
      token, state = step(params, token, state, keys[i + 1])


def print_sample(model: LanguageModel, params, sample_cfg, out=sys.stdout) -> str:
  """Streams a sample to ``out`` and reports the decode speed and state size; returns the text."""
  prompt = sample_cfg.prompt.encode("utf-8")
  out.write(f"--- sample (prompt {sample_cfg.prompt!r}, temperature {sample_cfg.temperature}, "
            f"top_k {sample_cfg.top_k}, top_p {sample_cfg.top_p}, seed {sample_cfg.seed})\n")
  out.write(sample_cfg.prompt)
  decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
  start, produced, arrivals = time.perf_counter(), bytearray(), []
  for value in generate(model, params, prompt, sample_cfg):
    arrivals.append(time.perf_counter())
    produced.append(value)
    out.write(decoder.decode(bytes([value])))
    out.flush()
  # Token 0 comes from the prefill, token 1 from the first (compiling) step; time the rest.
  steady = (len(arrivals) - 2) / (arrivals[-1] - arrivals[1]) if len(arrivals) > 2 else float("nan")
  in_use = decode_state_bytes(model.config, 1, len(prompt) + len(produced))
  out.write(f"\n--- prefill {len(prompt)} tokens: {arrivals[0] - start:.2f} s with compilation; "
            f"decode: {steady:.1f} tokens/s after compilation; decode state "
            f"{decode_state_bytes(model.config, 1):,} bytes allocated, {in_use:,} bytes in use "
            f"after {len(prompt) + len(produced)} tokens\n")
  return produced.decode("utf-8", errors="replace")


def main(argv: list[str]) -> None:
  from train.cli import parse_args
  from train.loop import load_for_inference

  config = parse_args(argv, prog="python -m train.generate")
  model, params = load_for_inference(config)
  print_sample(model, params, config.sample)


if __name__ == "__main__":
  main(sys.argv[1:])
