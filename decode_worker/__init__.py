"""Decode worker (D) and the single-engine `both` worker: reservations, continuous batching,
preemption, one STEP frame per engine step. `server.DecodeLoop` / `server.BothLoop`;
`pdserve decode` / `pdserve worker --role both` start them."""
