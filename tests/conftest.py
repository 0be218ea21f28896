"""Shared test fixtures."""

import os
import signal

import jax
import pytest

from cluster.loopback import keep_loopback
from orchestrator import interrupts

# Every Ray this suite starts (embedded sweeps, ray.cluster_utils clusters, `ccn` subprocesses that
# inherit this environment) registers and listens on 127.0.0.1 only: never on the network address.
keep_loopback()

# Every in-process Ray of this suite (embedded sweeps, ray.cluster_utils clusters) runs without
# token authentication. Ray 2.60 fixes a process's mode at its first ray.init (a new local cluster
# turns tokens on), so a later in-process cluster started in the other mode rejects the driver's
# calls and destroys its actors. Subprocess tests choose their own mode (test_cluster_local.ccn_env).
os.environ["RAY_AUTH_MODE"] = "disabled"


@pytest.fixture
def x64():
    """Run a test in 64-bit JAX (float64 exactness checks), restoring the mode afterwards."""
    with jax.enable_x64(True):
        yield


@pytest.fixture(autouse=True)
def signal_handling_of_its_own():
    """Each test leaves SIGINT/SIGTERM handling as it found it and no stop pending: an in-process
    `cli.main` installs ccn's handlers (orchestrator.interrupts), and a stop it recorded (e.g. the
    lease heartbeat's interrupt when a test makes the results unwritable) must not reach the next
    test's sweep on the same worker."""
    before = {signum: signal.getsignal(signum) for signum in interrupts.SIGNALS}
    yield
    for signum, handler in before.items():
        signal.signal(signum, handler)
    interrupts.reset()
