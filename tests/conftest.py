"""Shared test fixtures."""

import jax
import pytest


@pytest.fixture
def x64():
    """Run a test in 64-bit JAX (float64 exactness checks), restoring the mode afterwards."""
    with jax.enable_x64(True):
        yield
