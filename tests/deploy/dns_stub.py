"""`python -m pdserve` with one part replaced: the proxy's lookups of the names listed in the
JSON file $STUB_DNS_FILE ({"name": ["address", ...]}) answer from that file, read
afresh each time; any other name resolves as usual. It stands in for Docker's embedded DNS
(which lists every running replica of a compose service under the service's name) in
tests/deploy/test_compose_scaling.py; everything else is the real command."""

from __future__ import annotations

import json
import os
import sys

from pdserve.proxy import registry

_real_resolve = registry._resolve


async def _resolve(host: str, port: int) -> list[str]:
    with open(os.environ["STUB_DNS_FILE"]) as f:
        names = json.load(f)
    if host not in names:
        return await _real_resolve(host, port)
    if not names[host]:  # no replica runs: the name does not resolve (NXDOMAIN)
        raise OSError(f"[Errno -2] Name or service not known: {host!r}")
    return sorted(names[host])


registry._resolve = _resolve  # before the registry is built: it takes this as its resolver

if __name__ == "__main__":
    from pdserve.cli import main

    sys.exit(main(sys.argv[1:]))
