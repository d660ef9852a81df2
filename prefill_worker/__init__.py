"""Prefill worker (P): prompt scheduler under a token budget, chunking, prefix cache, server.

Built in the workers issue; empty until then.
"""
