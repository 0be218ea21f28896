"""Ray on one machine, on loopback only.

Ray 2.60 on Linux replaces 127.0.0.1 with the machine's routable address wherever a node starts or
a driver connects (`ray._private.services.resolve_ip_for_localhost`), so a "local" Ray registers
its nodes at, and opens its GCS, raylet and object-manager ports on, the network interface. With
`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` Ray keeps loopback addresses as they are: every node
registers at 127.0.0.1 and every Ray listener binds 127.0.0.1. Each Ray process reads the setting
from its environment (Python ones once, when `ray._private.ray_constants` is imported), so it goes
into the environment of everything a single-machine Ray starts, and into the driver that attaches.

    keep_loopback()                      # this process and the Ray processes it starts
    python -m cluster.loopback start --block --address 127.0.0.1:PORT ...   # one loopback node

Ray's own `ray start` refuses to start a worker node while the setting is off (a guard meant for
Windows and macOS); the second form is `ray start` with only that guard lifted, and is how
`ccn cluster up` starts its nodes.
"""

from __future__ import annotations

import ipaddress
import os
import sys
import types
from urllib.parse import urlparse

ENV_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
LOOPBACK_ENV = {ENV_VAR: "0"}


def is_loopback(host: str | None) -> bool:
    """Whether `host` names this machine's loopback interface (127.0.0.0/8, ::1, localhost)."""
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1, how an IPv6 socket names an IPv4 bind
    return (mapped or ip).is_loopback


def address_is_loopback(address: str | None) -> bool:
    """Whether a Ray address (HOST:PORT or ray://HOST:PORT) points at loopback."""
    if not address or address in ("auto", "local"):
        return False
    return is_loopback(urlparse(address if "://" in address else f"ray://{address}").hostname)


def keep_loopback() -> None:
    """Make this process, and every Ray process it starts, keep 127.0.0.1 (works after `import ray` too)."""
    os.environ[ENV_VAR] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:  # already imported: it read the environment before we set it
        constants.ENABLE_RAY_CLUSTER = False


def start_node(arguments: list[str]) -> None:
    """`ray start ARGUMENTS` for a node on loopback (a worker node too); returns when Ray's CLI does."""
    keep_loopback()
    from ray._private import ray_constants
    from ray.scripts import scripts

    class _CliConstants(types.ModuleType):
        """Ray's constants as the CLI sees them, but with multi-node start allowed."""

        ENABLE_RAY_CLUSTER = True

        def __getattr__(self, name: str):
            return getattr(ray_constants, name)

    scripts.ray_constants = _CliConstants("ray_constants")  # only the CLI's guard; addresses stay loopback
    sys.argv = ["ray", *arguments]
    scripts.main()


if __name__ == "__main__":
    start_node(sys.argv[1:])
