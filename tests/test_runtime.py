"""Safe defaults of the Ray cluster that warp-ray starts by itself."""

from __future__ import annotations

import ipaddress

import psutil
import ray


def test_a_local_cluster_listens_on_loopback_only(ray_cluster):
    @ray.remote
    def ping() -> int:
        return 1

    assert ray.get(ping.remote()) == 1  # workers are up too
    ray_processes = [p for p in psutil.process_iter(["name", "cmdline"])
                     if any(part in " ".join(p.info["cmdline"] or []) for part in ("ray", "raylet", "gcs_server"))]
    listening = [c for p in ray_processes for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert listening, "found no listening Ray socket to check"
    exposed = [c.laddr for c in listening if not ipaddress.ip_address(c.laddr.ip.removeprefix("::ffff:")).is_loopback]
    assert exposed == []
