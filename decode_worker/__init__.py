"""Decode worker (D): reservations, continuous batching, preemption, server.

Built in the workers issue; empty until then.
"""
