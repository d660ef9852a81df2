"""OpenAI-compatible routing proxy (`pdserve serve`).

Owns the OpenAI protocol: templates, tokenization, detokenization, stop strings, usage and
error shapes; picks a decode worker (D) then a prefill worker (P) per request.
Built in the proxy issue; empty until then.
"""
