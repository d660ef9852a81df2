"""Prefill worker (P): batches prompts under a token budget (chunking, prefix cache), samples
the first token(s), answers the proxy at once, and offers the KV to the D that reserved
room. `server.PrefillLoop` is the step loop; `pdserve prefill` starts it."""
