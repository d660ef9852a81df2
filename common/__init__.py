"""The torch-free bottom layer: what crosses process boundaries, and what every process
(the proxy, the workers, the command line) shares without importing torch.

`params` (SamplingParams), `wire` (the request record, token rows and the typed messages of
the proxy <-> worker data path, with the codec the KV control plane reuses), `prefix`
(prefix-block hashing: the proxy and the workers name blocks alike), `compat` (the
compatibility record every handshake compares), `options` (how config fields declare their
flags). Nothing here imports another pdserve package.
"""

__version__ = "0.1.0"


class UserError(Exception):
    """Something the user must change (an option, a checkpoint, a path), not a bug: the
    command line prints it as one line instead of a traceback."""
