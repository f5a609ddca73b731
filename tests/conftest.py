"""Test-session setup: 8 simulated CPU devices for the data-parallel tests.

XLA reads ``XLA_FLAGS`` once, when JAX first initialises its backend, so this must run
before any test module imports JAX. Single-device code simply runs on the first device.
"""
import os

_FLAG = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
