"""A model whose tokenizer lives in another directory (`--tokenizer`), end to end: the proxy
and the workers name the model with the same function (common/compat.py), so the workers
are admitted and text requests work; a worker with another tokenizer is refused, with the
reason in the proxy's /health."""

from __future__ import annotations

import shutil

import httpx
import openai
import pytest

from pdserve import LLM, SamplingParams
from tests.e2e.test_cluster_e2e import KEY, start_proxy, stop_all
from tests.workers.cluster import start_worker, wait_healthy

pytestmark = pytest.mark.timeout(300)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="module")
def split_checkpoint(tmp_path_factory):
    """(model dir without tokenizer files, tokenizer dir) of the built-in model."""
    from pdserve.engine.builtin_model import builtin_model_path

    tmp = tmp_path_factory.mktemp("split")
    full = builtin_model_path(tmp / "cache")
    model, tok = tmp / "model", tmp / "tokenizer"
    shutil.copytree(full, model)
    tok.mkdir()
    for name in TOKENIZER_FILES:
        shutil.move(model / name, tok / name)
    return model, tok


def test_a_separate_tokenizer_directory_serves_and_a_mismatch_is_refused(split_checkpoint,
                                                                          tmp_path):
    model, tok = split_checkpoint
    args = ("--model", str(model), "--tokenizer", str(tok))
    ws = [start_worker("prefill", tmp_path, *args), start_worker("decode", tmp_path, *args),
          start_worker("decode", tmp_path, "--model", str(model))]  # no tokenizer: refused
    proc = None
    try:
        wait_healthy(ws)
        proc, url, _ = start_proxy(tmp_path, [ws[0].http], [ws[1].http, ws[2].http], *args,
                                   "--min-pd-prompt-tokens", "0")
        workers = {w["url"]: w for w in httpx.get(url + "/health").json()["workers"]}
        assert workers[ws[0].http]["refused"] is None and workers[ws[1].http]["refused"] is None
        assert "tokenizer_hash" in workers[ws[2].http]["refused"], workers
        with openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60) as c:
            prompt = "The proxy and the workers agree on the tokenizer"
            got = c.completions.create(model=c.models.list().data[0].id, prompt=prompt,
                                       max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
        want = LLM(str(model), tokenizer=str(tok), use_tqdm_on_load=False, max_model_len=512,
                   num_gpu_blocks_override=400).generate(
            prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
        assert got.choices[0].text == want[0].outputs[0].text
        assert got.usage.prompt_tokens == len(want[0].prompt_token_ids)
    finally:
        stop_all(proc, ws)
