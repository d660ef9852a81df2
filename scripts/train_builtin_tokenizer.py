"""Train the tokenizer of pdserve's built-in default model and write its shipped files.

Run once, offline, by a developer; the outputs are committed under `engine/builtin/` and the
package never trains anything at run time (see `engine/builtin_model.py`).

    python scripts/train_builtin_tokenizer.py                   # train, write every shipped file
    python scripts/train_builtin_tokenizer.py --check           # retrain in a temp dir; compare
    python scripts/train_builtin_tokenizer.py --snapshot-stdlib # refresh the docstring corpus

The tokenizer is a byte-level BPE (the Llama-3 / GPT-2 scheme: a regex split, then every byte
mapped to a printable character), so any UTF-8 text encodes and decodes back unchanged. Its
vocabulary is 4096 entries: the 5 Llama-3 special tokens (ids 0-4), the 256 byte tokens and
3835 merges.

Corpus: every `scripts/builtin_corpus/*.txt`, in sorted order, and nothing else, so the result
depends only on files in the repo (training is deterministic given them: `--check` verifies).

- `pdserve_corpus.txt`: hand-written prose, chat exchanges, code, numbers and short sentences in
  a dozen languages, so chat text, code and non-Latin scripts get some merges of their own.
- `stdlib_docstrings.txt`: a snapshot of the docstrings of a fixed list of Python standard
  library modules (technical English, the bulk of the corpus; Python Software Foundation
  License). It is a committed snapshot, not read live, because docstrings change with the Python
  version; `--snapshot-stdlib` rewrites it from the running interpreter.

The project's README and docs are deliberately not used: they change with every commit, which
would make a retrain silently produce a different tokenizer.

Besides the tokenizer (tokenizer.json, tokenizer_config.json, chat_template.jinja) it writes
config.json and generation_config.json, whose token ids come from the tokenizer, and finally
manifest.json (seed, weights hash, file hashes) through `pdserve.engine.builtin_model.write_manifest`.
"""

from __future__ import annotations

import argparse
import filecmp
import importlib
import inspect
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CORPUS_DIR = ROOT / "scripts" / "builtin_corpus"
OUT_DIR = ROOT / "pdserve" / "builtin"
STDLIB_SNAPSHOT = CORPUS_DIR / "stdlib_docstrings.txt"

VOCAB_SIZE = 4096
BOS, EOT_TEXT, START_HEADER, END_HEADER, EOT = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
)
SPECIAL_TOKENS = [BOS, EOT_TEXT, START_HEADER, END_HEADER, EOT]  # ids 0..4, in this order

# Llama-3's pre-tokenizer split: contractions, letter runs with one leading non-letter, digits in
# groups of at most 3, punctuation runs, newlines, whitespace.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Llama-3's chat format. Content may be a string, None (an assistant turn that only called a
# tool) or an OpenAI-style list of parts, of which the text parts are kept.
CHAT_TEMPLATE = """\
{{- bos_token }}
{%- for message in messages %}
    {%- if message['content'] is string %}
        {%- set content = message['content'] %}
    {%- elif message['content'] is none %}
        {%- set content = '' %}
    {%- else %}
        {%- set content = message['content'] | selectattr('type', 'equalto', 'text') \
| map(attribute='text') | join('') %}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + content | trim \
+ '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# The model half of the checkpoint; vocab and token ids are filled in from the tokenizer.
MODEL_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "rms_norm_eps": 1e-05,
    "attention_bias": False,
    "mlp_bias": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "use_cache": True,
    "dtype": "float32",
}

# Standard-library modules whose docstrings form the bulk of the corpus (fixed: the snapshot is
# only rewritten on purpose). Each contributes at most STDLIB_CAP characters, so no single large
# module (typing, os, logging) dominates the merges.
STDLIB_MODULES = (
    "argparse", "asyncio.events", "asyncio.tasks", "base64", "bisect", "calendar", "collections",
    "contextlib", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum",
    "fractions", "functools", "glob", "gzip", "hashlib", "heapq", "html.parser", "http.client",
    "http.server", "inspect", "ipaddress", "itertools", "json", "logging", "numbers", "operator",
    "os", "pathlib", "pickle", "pprint", "queue", "random", "re", "sched", "secrets", "shlex",
    "shutil", "socket", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "typing", "unittest.case", "urllib.parse", "uuid", "warnings",
    "zipfile",
)
STDLIB_CAP = 3000


def snapshot_stdlib(path: Path = STDLIB_SNAPSHOT) -> None:
    """Write the docstrings of STDLIB_MODULES (module, then its own public names) to `path`."""
    seen: set[str] = set()
    parts = [
        "# pdserve built-in tokenizer corpus, part 2: Python standard library docstrings\n"
        f"# Snapshot from CPython {sys.version.split()[0]} (Python Software Foundation License),\n"
        "# written by scripts/train_builtin_tokenizer.py --snapshot-stdlib.\n"
    ]
    for name in STDLIB_MODULES:
        module = importlib.import_module(name)
        docs: list[str] = [inspect.getdoc(module) or ""]
        for attr, obj in sorted(vars(module).items()):
            # only names defined here: re-exports (os exports half of posix) would repeat
            if attr.startswith("_") or getattr(obj, "__module__", None) != name:
                continue
            docs.append(inspect.getdoc(obj) or "")
            if inspect.isclass(obj):
                docs += [inspect.getdoc(m) or "" for a, m in sorted(vars(obj).items())
                         if not a.startswith("_") and callable(m)]
        kept, size = [], 0
        for doc in docs:
            if doc and doc not in seen and size < STDLIB_CAP:
                seen.add(doc)
                kept.append(doc)
                size += len(doc)
        parts.append(f"\n## {name}\n\n" + "\n\n".join(kept) + "\n")
    path.write_text("".join(parts), encoding="utf-8")
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size} bytes)")


def corpus_texts() -> list[str]:
    files = sorted(CORPUS_DIR.glob("*.txt"))
    if not files:
        raise SystemExit(f"no corpus files in {CORPUS_DIR}")
    return [f.read_text(encoding="utf-8") for f in files]


def train_tokenizer():
    """The trained tokenizer, wrapped for transformers (bos/eos set, chat template attached)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
        # all 256 bytes, even those absent from the corpus: nothing is ever out of vocabulary
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus_texts(), trainer=trainer)
    if tok.get_vocab_size() != VOCAB_SIZE:
        raise SystemExit(f"trained {tok.get_vocab_size()} tokens, wanted {VOCAB_SIZE}: corpus too small")
    bos_id = tok.token_to_id(BOS)
    # as Llama-3: plain encode() prepends <|begin_of_text|>; the chat template writes its own
    # and apply_chat_template encodes without special tokens, so a chat gets exactly one
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)],
        ),
    ])
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOT,
        model_max_length=MODEL_CONFIG["max_position_embeddings"],
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def write_outputs(out: Path) -> None:
    """Write tokenizer files, config.json and generation_config.json into `out`."""
    tok = train_tokenizer()
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    # transformers 5 writes "TokenizersBackend"; the classic name loads in every version
    cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    _write_json(cfg_path, tok_cfg)

    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = dict(MODEL_CONFIG, vocab_size=len(tok), bos_token_id=ids[BOS],
                  eos_token_id=[ids[EOT_TEXT], ids[EOT]])
    _write_json(out / "config.json", dict(sorted(config.items())))
    _write_json(out / "generation_config.json", {
        "bos_token_id": ids[BOS], "eos_token_id": [ids[EOT_TEXT], ids[EOT]],
        # no pad token in the vocabulary (as Llama-3); batching pads with end-of-text
        "pad_token_id": ids[EOT_TEXT], "do_sample": False,
    })


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def check() -> int:
    """Retrain into a temp dir and compare with the shipped files; 0 when identical."""
    names = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json",
             "generation_config.json"]
    with tempfile.TemporaryDirectory() as tmp:
        write_outputs(Path(tmp))
        bad = [n for n in names if not filecmp.cmp(Path(tmp) / n, OUT_DIR / n, shallow=False)]
    print("shipped files match a retrain" if not bad else f"differ from a retrain: {bad}")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="retrain and compare, write nothing")
    mode.add_argument("--snapshot-stdlib", action="store_true",
                      help=f"rewrite {STDLIB_SNAPSHOT.relative_to(ROOT)} from this Python")
    args = ap.parse_args(argv)
    if args.snapshot_stdlib:
        snapshot_stdlib()
        return 0
    if args.check:
        return check()
    write_outputs(OUT_DIR)
    sys.path.insert(0, str(ROOT))
    from pdserve.engine.builtin_model import write_manifest

    manifest = write_manifest()
    for name in sorted(p.name for p in OUT_DIR.iterdir()):
        print(f"{name:24} {(OUT_DIR / name).stat().st_size:>8} bytes")
    print(f"weights_sha256 {manifest['weights_sha256']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
