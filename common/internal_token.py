"""The internal token's start-up policy, shared by the workers and the proxy: fail closed.

The token authenticates every internal channel (proxy -> worker data path, the workers'
/load and /info, P -> D KV handshakes). A process that would serve those channels, or
talk to workers it did not start, refuses to start:

- with no token, unless told `--insecure-no-token` (then every internal check is off, and
  the process logs a warning saying so);
- with a token that is a known placeholder (`change-me`, `<your-token>`, `secret`, an
  unexpanded `${VAR}` or `$(openssl rand -hex 16)`, ...): a template copied as it is;
- with both a token and `--insecure-no-token` (which of the two was meant is unclear).

`pdserve serve` with no worker URLs starts its own workers and draws a random token for
them, so it never needs either. The callers (pdserve/cli.py, pdserve/serve.py) turn a
problem string into a ConfigError; this module only decides.
"""

from __future__ import annotations

import re

INSECURE_FLAG = "--insecure-no-token"

# Compared after lowercasing and dropping every character but letters and digits, so
# "Change_Me", "<change-me>" and "${TOKEN}" all match their plain word.
_PLACEHOLDERS = frozenset({
    "changeme", "replaceme", "placeholder", "token", "internaltoken", "pdserveinternaltoken",
    "yourtoken", "mytoken", "yoursecret", "mysecret", "secret", "password", "yourpassword",
    "passwd", "example", "default", "xxx", "todo", "fixme",
})
# a template's instruction left in the value ("change-me-openssl-rand-hex-16")
_PLACEHOLDER_PREFIXES = ("changeme", "replaceme")


def placeholder_problem(token: str) -> str | None:
    """Why `token` is not a usable secret, or None: the `--internal-token` option's check.

    Never echoes the value (it may be a real secret typed in the wrong place).
    """
    norm = re.sub(r"[^a-z0-9]", "", token.lower())
    fix = "set a random token (e.g. `openssl rand -hex 16`), the same on the proxy and every worker"
    if not norm:
        return f"no letters or digits: {fix}"
    if token.lstrip().startswith(("${", "$(")):
        return f"an unexpanded shell expression: {fix}"
    if "opensslrand" in norm:
        return f"the command that makes a token, not its output: {fix}"
    if norm in _PLACEHOLDERS or norm.startswith(_PLACEHOLDER_PREFIXES):
        return f"a placeholder, not a secret: {fix}"
    return None


def start_problem(token: str | None, insecure_no_token: bool, *, who: str) -> str | None:
    """None when a process with this token setting may start; else why not (one line).

    `who` names the process in the message ("a worker", "the proxy of workers given by URL").
    """
    if token and insecure_no_token:
        return (f"--internal-token (or PDSERVE_INTERNAL_TOKEN) is set and so is "
                f"{INSECURE_FLAG}: give one of them")
    if not token and not insecure_no_token:
        return (f"no internal token: {who} refuses to start without one. Set "
                f"--internal-token or PDSERVE_INTERNAL_TOKEN (e.g. `openssl rand -hex 16`, the "
                f"same on the proxy and every worker), or pass {INSECURE_FLAG} to run with "
                f"every internal check off (anyone who can reach the workers' ports can then "
                f"generate and send KV)")
    return None


def insecure_warning(what: str) -> str:
    """The warning a process logs at start under `--insecure-no-token`."""
    return (f"running with no internal token ({INSECURE_FLAG}): every internal check is off; "
            f"anyone who can reach {what} can use them")
