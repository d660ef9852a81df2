"""KV transfer between P and D: ZMQ control plane, shm / tcp (and cuda_ipc) data planes.

D reserves blocks for a request (`KVReceiver.reserve`); P, once the prompt's KV is written,
offers its blocks (`KVSender.offer`); the data moves (D pulls over shared memory or CUDA IPC,
or P pushes over TCP); D confirms after its copy is complete; P frees. Every state has a
deadline, a cancel from either side frees both, and every message carries the sender's
epoch so a restarted peer's stale state is dropped. See DESIGN.md §1, §2, §6.

Modules: `protocol` (messages, compatibility record, the tcp data sockets' framing),
`channel` (ZMQ sockets, data socket options), `shm` (CPU pools in /dev/shm), `states` (the
Enum state machines), `receiver` (D), `sender` (P), `transports` (D's strategy per P),
`tcp_recv` / `tcp_send` (the tcp data plane: D's data port and readers, P's connections and
senders), `cuda_ipc` (GPU pools), `metrics` (Prometheus).
"""
