"""The table of issue 25's two-GPU run (bench/gpu_two_gpu_pd.sh), read from its JSON files,
with each Must-show bar beside what was measured. Prints; never asserts.

    python bench/two_gpu_report.py OUT_DIR

OUT_DIR holds kernels/kv_transfer.json (bench/kv_transfer.py --kernel-only),
pull16k/pull_beside_decode.json (bench/pull_beside_decode.py, D's GPU pulling from P's) and
handoff.json (bench/handoff.py --mode gpu --gpu P,D). A file that is missing or a figure that
was not measured prints as "-". Rows measured with P and D on one GPU (a dry run on a
one-GPU machine) say so: they exercise the script, not the bars.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def fmt(v, nd: int = 2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def verdict(ok: bool | None, cross: bool) -> str:
    if ok is None:
        return "not measured"
    word = "met" if ok else "NOT met"
    return word if cross else f"{word} (dry run, one GPU: not the bar)"


def report(out: Path) -> list[str]:
    lines: list[str] = []
    kern = load(out / "kernels" / "kv_transfer.json") or {}
    rows = [r for r in kern.get("rows", []) if r.get("kind") == "kernel"]
    cross_rows = [r for r in rows if r.get("where", "").startswith("GPU")]
    use = cross_rows or rows
    cross = bool(cross_rows)
    lines.append(f"## cuda_ipc gather vs the same-run copy ({'across GPUs' if cross else 'one GPU'})")
    lines.append("| tokens | MiB | gather GB/s | copy GB/s | % of copy | bar (>= 95% at 4k, 16k) |")
    lines.append("|---|---|---|---|---|---|")
    for r in use:
        bar = r["tokens"] in (4096, 16384)
        ok = r["pct_of_copy"] >= 95 if bar else None
        lines.append(f"| {r['tokens']} | {r['mib']:.0f} | {r['gather_gbs']:.0f} | "
                     f"{r['copy_gbs']:.0f} | {r['pct_of_copy']:.1f}% | "
                     f"{verdict(ok, cross) if bar else '-'} |")
    for e in kern.get("errors", []):
        lines.append(f"error: {e}")

    pull = load(out / "pull16k" / "pull_beside_decode.json") or {}
    pcross = bool(pull.get("cross_gpu"))
    lines.append("")
    lines.append(f"## decode step (batch {pull.get('batch', '-')}) beside back-to-back "
                 f"{pull.get('tokens', '-')}-token pulls "
                 f"({pull.get('src_device', '?')} -> {pull.get('dst_device', '?')})")
    lines.append("| method | pull alone ms | % of copy | step alone ms | beside ms | slowdown | "
                 "bar (<= 15%) |")
    lines.append("|---|---|---|---|---|---|---|")
    for r in pull.get("methods", []):
        ok = r["slowdown_pct"] <= 15
        lines.append(f"| {r['method']} | {r['pull_ms']:.3f} | {r['pct_of_copy']:.0f}% | "
                     f"{r['step_ms_alone']:.2f} | {r['step_ms_beside']:.2f} | "
                     f"{r['slowdown_pct']:+.1f}% | {verdict(ok, pcross)} |")
    for e in pull.get("errors", []):
        lines.append(f"error: {e}")

    ho = load(out / "handoff.json") or {}
    modes = ho.get("modes", {})
    pd = (modes.get("gpu-pd") or {}).get("median") or {}
    both = (modes.get("gpu-both") or {}).get("median") or {}
    gpus = str(ho.get("args", {}).get("gpu", "?"))
    hcross = len(set(gpus.split(","))) > 1
    lines.append("")
    lines.append(f"## handoff (GPUs {gpus}): P/D vs both-role workers")
    lines.append("| mode | TTFT p50 ms | token-2 gap p50 | ITL p50 | excess p50 / p90 ms |")
    lines.append("|---|---|---|---|---|")
    for name, m in (("P/D", pd), ("both-role", both)):
        lines.append(f"| {name} | {fmt(m.get('ttft_ms_p50'))} | {fmt(m.get('token2_gap_ms_p50'))}"
                     f" | {fmt(m.get('itl_ms_p50'))} | {fmt(m.get('excess_ms_p50'))} / "
                     f"{fmt(m.get('excess_ms_p90'))} |")
    ex, itl = pd.get("excess_ms_p50"), pd.get("itl_ms_p50")
    ok1 = None if ex is None or itl is None else ex <= 0.5 * itl + 3
    lines.append(f"- excess p50 {fmt(ex)} <= 0.5 x ITL p50 {fmt(itl)} + 3 ms: "
                 f"{verdict(ok1, hcross)}")
    t_pd, t_both = pd.get("ttft_ms_p50"), both.get("ttft_ms_p50")
    ok2 = None if t_pd is None or t_both is None else t_pd <= t_both + 5
    lines.append(f"- P/D TTFT p50 {fmt(t_pd)} <= both-role TTFT p50 {fmt(t_both)} + 5 ms: "
                 f"{verdict(ok2, hcross)}")
    for mode, r in modes.items():
        if r.get("error"):
            lines.append(f"error ({mode}): {r['error']}")
    return lines


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    print("\n".join(report(Path(sys.argv[1]))))


if __name__ == "__main__":
    main()
