"""Test session setup: 8 host CPU devices, set before JAX starts, a compilation cache for each
test process, hypothesis profiles, and XLA's optimisation passes off for the tests marked
``compile_bound``."""

import os

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import hypothesis  # noqa: E402
import jax  # noqa: E402
import pytest  # noqa: E402

# A compilation cache for this process alone, fresh each run and removed at exit: a program
# compiled again in another test (the same kernel traced anew, both trees of a revision A/B)
# is then read back instead of compiled. One directory a worker process, since the cache's
# writes are not atomic unless it evicts.
_COMPILATION_CACHE = tempfile.mkdtemp(prefix="jax_compilation_cache_")
atexit.register(shutil.rmtree, _COMPILATION_CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _COMPILATION_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)

# "ci" keeps the suite under 10 minutes on a 2-core machine with fresh examples each run (two
# per property: every CI run draws new ones, and the fixed cases beside each property run
# always); "thorough" (HYPOTHESIS_PROFILE=thorough) draws 30 times as many. The op tests run one property
# per implementation through a shared base class, which hypothesis reports as "differing
# executors": each subclass draws its own examples, so the check is suppressed.
hypothesis.settings.register_profile(
    "ci", max_examples=2, deadline=None, derandomize=False,
    suppress_health_check=[hypothesis.HealthCheck.too_slow,
                           hypothesis.HealthCheck.differing_executors])
hypothesis.settings.register_profile(
    "thorough", max_examples=60, deadline=None, derandomize=False,
    suppress_health_check=[hypothesis.HealthCheck.too_slow,
                           hypothesis.HealthCheck.differing_executors])
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _compile_bound(request):
  """A test marked ``compile_bound`` (itself, its class or its module: ``pytestmark``; the
  closest marker counts) runs with ``jax_disable_most_optimizations``: its tests compile many
  small programs and run each briefly, and skipping XLA's optimisation passes cut test_models
  from 106 s to 66 s and the plain-JAX agreement classes from 41 s to 26 s (the same operations,
  unfused). The interpret-mode Pallas kernels are compile-bound too (six of their slowest tests:
  191 s to 144 s, none slower). Tests whose time goes into running programs (the recall
  training: 600 steps 39 s with the passes, 52 s without) or that check what the optimised
  compile gives (the scan's backward memory) keep the passes: ``compile_bound(False)``."""
  marker = request.node.get_closest_marker("compile_bound")
  if marker is None or marker.args[:1] == (False,):
    yield
    return
  previous = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)
