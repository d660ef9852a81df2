"""The engine shared by P and D: model config, weight loading, paged KV pool, block manager,
model runner, sampler, tokenizer, and the offline `LLM` API. No role policy lives here."""
