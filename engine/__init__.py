"""The engine shared by P and D: model config, weight loading, paged KV pool, block manager,
scheduler (with the P/D role rules), step loop, model runner, sampler, tokenizer, the built-in
model and the offline `LLM` API. No routing policy lives here."""
