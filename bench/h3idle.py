"""Memory per idle HTTP/3 connection: open N connections, one GET each, hold them, and read the
growth of the server's resident memory.

    python -m bench.h3idle --port PORT --pids PID[,PID...] [--connections 500]

Every connection is aioquic's client (ALPN h3, the certificate not verified) with one answered
GET, then held open (aioquic's client answers the server's PINGs and keeps-alive nothing itself:
the server's idle timeout must be longer than the run, gunicorn's keepalive is 30 s in the
package's conf). The figure is (VmRSS summed over `--pids` after the connections are open and
1 s has passed) minus (before), divided by the connections; kernel socket buffers are not in it.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import ssl
import time

from aioquic.asyncio import connect
from aioquic.h3.connection import H3_ALPN
from aioquic.quic.configuration import QuicConfiguration

from bench.h3load import Client


def rss_kb(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


async def hold(port: int, count: int, pids: list[int]) -> dict:
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, verify_mode=ssl.CERT_NONE)
    authority = b"127.0.0.1:%d" % port
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(10):  # the first connections' allocations are not the figure
            client = await stack.enter_async_context(
                connect("127.0.0.1", port, configuration=config, create_protocol=Client)
            )
            await client.get(authority)
        await asyncio.sleep(1.0)
        before = rss_kb(pids)
        ok = 0
        started = time.monotonic()
        for _ in range(count):
            client = await stack.enter_async_context(
                connect("127.0.0.1", port, configuration=config, create_protocol=Client)
            )
            status, body, _started, _ = await asyncio.wait_for(client.get(authority), 10)
            ok += status == b"200" and body == b"Vrypt"
        opened = time.monotonic() - started
        await asyncio.sleep(1.0)
        after = rss_kb(pids)
    return {
        "connections": count,
        "ok": ok,
        "opened_s": opened,
        "rss_before_kb": before,
        "rss_after_kb": after,
        "idle_bytes_per_connection": (after - before) * 1024 / max(1, count),
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.h3idle", description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--pids", required=True, help="the server's processes, comma-separated")
    p.add_argument("--connections", type=int, default=500)
    args = p.parse_args()
    pids = [int(pid) for pid in args.pids.split(",") if pid]
    print(json.dumps(asyncio.run(hold(args.port, args.connections, pids))))


if __name__ == "__main__":
    main()
