"""The compatibility record (DESIGN.md §4): what two engines, and the proxy and each worker,
must agree on before requests or KV move between them.

`model_identity(model_path, tokenizer_path)` is the one function that names a model: the
proxy checks every worker's record against it, and each worker builds its own record from
it (`CompatRecord.build`), so a `--tokenizer` directory counts alike on both sides.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pdserve.common.prefix import PREFIX_HASH_FUNCTION

# The cluster's wire protocol: the proxy <-> worker data path and the KV control plane.
PROTOCOL_VERSION = 4  # 4: tcp KV moves over data sockets beside the ZMQ session (issue 24)


def config_hash(raw: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a checkpoint's config.json."""
    return hashlib.sha256(json.dumps(raw, sort_keys=True, separators=(",", ":"))
                          .encode("utf-8")).hexdigest()


def model_identity(model_path: str | Path, tokenizer_path: str | Path | None = None
                   ) -> dict[str, str]:
    """{config_hash, tokenizer_hash} of a checkpoint, the tokenizer read from
    `tokenizer_path` (default: the checkpoint); "none" when there is no tokenizer.json.
    Raises OSError / ValueError when config.json cannot be read."""
    raw = json.loads((Path(model_path) / "config.json").read_text(encoding="utf-8"))
    tok = Path(tokenizer_path or model_path) / "tokenizer.json"
    return {"config_hash": config_hash(raw),
            "tokenizer_hash": hashlib.sha256(tok.read_bytes()).hexdigest() if tok.exists()
            else "none"}


@dataclass(frozen=True)
class CompatRecord:
    protocol_version: int
    model_id: str
    config_hash: str
    tokenizer_hash: str
    dtype: str
    block_size: int
    pool_layout: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_model_len: int
    prefix_hash: str

    @classmethod
    def build(cls, model_path: str, tokenizer_path: str | None, **pool: Any) -> CompatRecord:
        """A worker's record: its model's identity, the versions of this code, and `pool`
        (dtype, block_size, pool_layout, num_layers, num_kv_heads, head_dim, max_model_len)."""
        return cls(protocol_version=PROTOCOL_VERSION, model_id=Path(model_path).name,
                   **model_identity(model_path, tokenizer_path), prefix_hash=PREFIX_HASH_FUNCTION,
                   **pool)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def mismatch(self, other: Mapping[str, Any]) -> str | None:
        return compat_mismatch(self.to_dict(), other)


def compat_mismatch(ours: Mapping[str, Any], theirs: Mapping[str, Any]) -> str | None:
    """None if two records (as maps) are compatible, else their first difference. The model's
    directory name and max_model_len may differ (each side enforces its own); nothing else."""
    for key, value in ours.items():
        if key not in ("model_id", "max_model_len") and theirs.get(key) != value:
            return f"{key} differs: ours {value!r}, peer's {theirs.get(key)!r}"
    return None
