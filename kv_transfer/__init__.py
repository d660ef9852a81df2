"""KV transfer between P and D: ZMQ control plane, cuda_ipc / shm / tcp data planes.

Built in the kv_transfer issue; empty until then.
"""
