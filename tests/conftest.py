"""Test session setup: 8 host CPU devices, set before JAX starts, and hypothesis profiles."""

import os

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import hypothesis  # noqa: E402

# "ci" keeps the suite under 10 minutes on a 2-core machine with fresh examples each run;
# "thorough" (HYPOTHESIS_PROFILE=thorough) draws 20 times as many. The op tests run one property
# per implementation through a shared base class, which hypothesis reports as "differing
# executors": each subclass draws its own examples, so the check is suppressed.
hypothesis.settings.register_profile(
    "ci", max_examples=3, deadline=None, derandomize=False,
    suppress_health_check=[hypothesis.HealthCheck.too_slow,
                           hypothesis.HealthCheck.differing_executors])
hypothesis.settings.register_profile(
    "thorough", max_examples=60, deadline=None, derandomize=False,
    suppress_health_check=[hypothesis.HealthCheck.too_slow,
                           hypothesis.HealthCheck.differing_executors])
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
