"""Argument checks shared by the ops: clear errors that name the argument and the expectation."""

from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import jax


def check_shape(name: str, x, expected: Sequence[int | None], meaning: str) -> None:
  """Raises ValueError unless ``x.shape`` matches ``expected`` (None matches any size).

  Args:
    name: the argument's name, as the caller wrote it.
    x: the array.
    expected: sizes per axis; None for a free axis.
    meaning: the expected layout in words, e.g. "[batch, time, channels]".
  """
  shape = tuple(x.shape)
  ok = len(shape) == len(expected) and all(e is None or e == s for s, e in zip(shape, expected))
  if not ok:
    want = "[" + ", ".join("?" if e is None else str(e) for e in expected) + "]"
    raise ValueError(f"{name} must have shape {meaning} = {want}, got {shape}")


def resolve_implementation(name: str | None, available: Sequence[str], default_by_platform=None,
                           unsupported: Mapping[str, str | None] | None = None) -> str:
  """Returns the implementation to run.

  Args:
    name: the caller's choice, or None for the fastest one that supports this platform.
    available: the implementations the op has, in the order of preference for ``None``.
    default_by_platform: optional {platform: implementation} for ``None``; otherwise the
      first of ``available``.
    unsupported: optional {implementation: reason} for this call's shapes and options (a reason
      of None means supported). A named implementation that cannot run raises ValueError with
      the reason; ``None`` falls back from the platform's default to the first of ``available``
      with a warning that gives the reason.
  """
  reasons = {k: v for k, v in (unsupported or {}).items() if v is not None}
  if name is None:
    platform = jax.default_backend()
    choice = (default_by_platform or {}).get(platform, available[0])
    if choice in reasons:
      fallback = next(i for i in available if i not in reasons)
      warnings.warn(f"implementation {choice!r} (the default on {platform}) does not support "
                    f"this call: {reasons[choice]}; using {fallback!r}", stacklevel=3)
      choice = fallback
    return choice
  if name not in available:
    raise ValueError(f"implementation must be one of {tuple(available)} or None, got {name!r}")
  if name in reasons:
    raise ValueError(f"implementation {name!r} does not support this call: {reasons[name]}")
  return name
