"""Alternate our jitted train step with a PyTorch peer's and compare throughput.

Runs under the project's venv; each peer runs in its own PyTorch venv (`make peers-venv`):

    make bench-peers                                   # both comparisons, defaults below
    .venv/bin/python tests/peers/compare.py flash      # FLASH-pytorch vs experiments/gau_lm.py:flash_peer
    .venv/bin/python tests/peers/compare.py unet       # diffusers vs experiments/ddpm_digits.py:unet_peer
    .venv/bin/python tests/peers/compare.py roformer   # RoFormerForMaskedLM vs experiments/char_mlm.py:peer
    .venv/bin/python tests/peers/compare.py bert       # BertForMaskedLM vs char_mlm.py:peer, model.position=learned
    .venv/bin/python tests/peers/compare.py flash --rounds 3 --steps 10 --peer_python .venv-peers/bin/python

Not part of `make test` (pytest.ini ignores tests/peers). Each round runs the peer script
(tests/peers/flash_pytorch_peer.py, diffusers_unet_peer.py or hf_mlm_peer.py) with the peer python, then
our benchmark (`python -m train_lib.benchmark`, with this interpreter, from the repository root), each as a fresh
subprocess timing `--steps` steps after its warm-up and printing a JSON line last. Alternating the two
spreads slow drifts of the machine over both. Prints a markdown table of each round's throughput
(tokens/s or images/s), the median over rounds, the median of the per-round ratios ours/peer, our MFU
and the peer's, then one JSON line:

    {"comparison": "flash" | "unet" | "roformer" | "bert", "ours_median", "peer_median", "ratio" (median
     of per-round ours/peer), "ours_mfu" (median), "peer_mfu" (median), "rounds", ...}

The peer's MFU uses our counted model FLOPs per token or image and the matmul peak our benchmark
measured in the same round: peer_mfu = ours_mfu × peer throughput / our throughput. The models have the
same dimensions (flash's and unet's parameter counts agree within 0.04%; our MLM encoder has 1% more, its
pooler, unused by the MLM loss). The MLM peers also score the unmasked positions, which ours skip, so their
MFU is one of useful work. It says how much headroom the machine leaves: beating the peer by a factor r
needs an MFU of r × peer_mfu.

Both sides use every core by default; run it on an otherwise quiet machine or the numbers mean little
(on a busy one PyTorch's OpenMP threads wait on each other and the peer slows several-fold more than
ours: `--peer_threads 1` measures how much).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

# Hugging Face's *ForMaskedLM scores every position, ours only the predicted ~15%: the same model and step as
# users run them, but not the same FLOPs, so the peer MFU below (from our FLOP count) understates its own.
_MLM_NOTE = ("the peer computes MLM logits at all positions, ours at the 15% predicted ones (the peer does about "
             "1.5× our FLOPs per token); the peer's MFU counts our FLOPs, i.e. useful work")

COMPARISONS = {
    "flash": {
        "peer_script": HERE / "flash_pytorch_peer.py",
        "ours_args": ["--config=experiments/gau_lm.py:flash_peer"],
        "unit": "tokens",
        "target": 1.5,  # the targets set for the peer comparison: ours / peer
    },
    "unet": {
        "peer_script": HERE / "diffusers_unet_peer.py",
        "ours_args": ["--config=experiments/ddpm_digits.py:unet_peer", "--sample_steps=0"],
        "unit": "images",
        "target": 1.3,
    },
    "roformer": {
        "peer_script": HERE / "hf_mlm_peer.py",
        "peer_args": ["--model", "roformer"],
        "ours_args": ["--config=experiments/char_mlm.py:peer"],
        "unit": "tokens",
        "target": 1.2,
        "note": _MLM_NOTE,
    },
    "bert": {
        "peer_script": HERE / "hf_mlm_peer.py",
        "peer_args": ["--model", "bert"],
        "ours_args": ["--config=experiments/char_mlm.py:peer", "--config.model.position=learned"],
        "unit": "tokens",
        "target": 1.2,
        "note": _MLM_NOTE,
    },
}


def last_json_line(stdout: str) -> dict:
    """The last stdout line that starts with '{', parsed (our benchmark prints a table before it)."""
    for line in reversed(stdout.splitlines()):
        if line.lstrip().startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in the output")


def run_json(cmd: list[str], what: str) -> dict:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        sys.exit(f"compare.py: {what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    try:
        return last_json_line(proc.stdout)
    except ValueError as e:
        sys.exit(f"compare.py: {what} printed no result ({e}): {' '.join(cmd)}\n{proc.stdout[-2000:]}")


def peer_mfu(our_mfu: float, ours: float, peer: float) -> float:
    """The peer's MFU from ours: same FLOPs per token/image and the same measured peak, so MFU ∝ throughput."""
    return our_mfu * peer / ours


def peer_mfus(our_mfus: list[float], ours: list[float], peers: list[float]) -> list[float]:
    """`peer_mfu` of each round."""
    return [peer_mfu(m, o, p) for m, o, p in zip(our_mfus, ours, peers)]


def markdown_table(unit: str, peer_label: str, peers: list[float], ours: list[float], our_mfus: list[float]) -> str:
    ratios = [o / p for o, p in zip(ours, peers)]
    their_mfus = peer_mfus(our_mfus, ours, peers)
    lines = [f"| round | {peer_label} {unit}/s | ours {unit}/s | ours / peer | peer MFU | our MFU |",
             "|---:|---:|---:|---:|---:|---:|"]
    for i, (p, o, r, pm, m) in enumerate(zip(peers, ours, ratios, their_mfus, our_mfus), 1):
        lines.append(f"| {i} | {p:,.0f} | {o:,.0f} | {r:.2f}× | {100 * pm:.0f}% | {100 * m:.0f}% |")
    lines.append(f"| median | {statistics.median(peers):,.0f} | {statistics.median(ours):,.0f} | "
                 f"{statistics.median(ratios):.2f}× | {100 * statistics.median(their_mfus):.0f}% | "
                 f"{100 * statistics.median(our_mfus):.0f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("comparison", choices=sorted(COMPARISONS))
    parser.add_argument("--rounds", type=int, default=3, help="peer-then-ours rounds")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run (each side reports the median)")
    parser.add_argument("--peer_threads", type=int, default=0,
                        help="the peer's torch threads (0: its default, os.cpu_count()); 1 shows how much of a "
                             "gap on a busy machine is PyTorch's OpenMP threads waiting on each other")
    parser.add_argument("--peer_python", default=str(ROOT / ".venv-peers" / "bin" / "python"),
                        help="python of the PyTorch venv (default: .venv-peers/bin/python in the repository)")
    args = parser.parse_args()
    if args.rounds < 1 or args.steps < 1 or args.peer_threads < 0:
        parser.error("--rounds and --steps must be ≥ 1, --peer_threads ≥ 0")
    peer_python = Path(args.peer_python)
    if not peer_python.is_absolute():
        peer_python = (Path.cwd() / peer_python)
    if not peer_python.exists():
        sys.exit(f"compare.py: peer python {args.peer_python} does not exist: run `make peers-venv` first")

    spec = COMPARISONS[args.comparison]
    unit = spec["unit"]
    key = f"{unit}_per_sec"
    peer_cmd = [str(peer_python), str(spec["peer_script"]), *spec.get("peer_args", []), "--steps", str(args.steps),
                "--threads", str(args.peer_threads)]
    ours_cmd = [sys.executable, "-m", "train_lib.benchmark", *spec["ours_args"], f"--steps={args.steps}"]

    peer_results, our_results = [], []
    for i in range(1, args.rounds + 1):
        print(f"round {i}/{args.rounds}: peer ...", end="", file=sys.stderr, flush=True)
        peer_results.append(run_json(peer_cmd, "the peer"))
        print(f" {peer_results[-1][key]:,.0f} {unit}/s; ours ...", end="", file=sys.stderr, flush=True)
        our_results.append(run_json(ours_cmd, "our benchmark"))
        print(f" {our_results[-1][key]:,.0f} {unit}/s", file=sys.stderr, flush=True)

    peers = [r[key] for r in peer_results]
    ours = [r[key] for r in our_results]
    ratio = statistics.median(o / p for o, p in zip(ours, peers))
    our_mfus = [r["mfu"] for r in our_results]
    mfu = statistics.median(our_mfus)
    peers_mfu = statistics.median(peer_mfus(our_mfus, ours, peers))
    peer, mine = peer_results[-1], our_results[-1]
    peer_label = f"{peer['peer']} {peer['version']}"
    print(f"\n{args.comparison}: {peer_label} (torch {peer['torch']}, {peer['threads']} threads, "
          f"{peer['params']:,} params) vs ours ({mine['config']}, {mine['devices']} {mine['platform']} "
          f"device(s), {mine['params']:,} params); {args.steps} timed steps per run\n")
    print(markdown_table(unit, peer_label, peers, ours, our_mfus))
    print(f"\nMFU (median): ours {100 * mfu:.1f}%, the peer's {100 * peers_mfu:.1f}% (of the matmul peak our "
          f"benchmark measured; {spec['target']}× the peer, the target, would need an MFU of "
          f"{100 * spec['target'] * peers_mfu:.0f}%)\n")
    if "note" in spec:
        print(f"Note: {spec['note']}.\n")
    print(json.dumps({
        "comparison": args.comparison, "unit": key, "ours_median": statistics.median(ours),
        "peer_median": statistics.median(peers), "ratio": ratio, "ours_mfu": mfu, "peer_mfu": peers_mfu,
        "peak_flops": statistics.median(r["peak_flops"] for r in our_results), "rounds": args.rounds,
        "steps": args.steps, "ours_per_round": ours, "peer_per_round": peers, "ours_params": mine["params"],
        "peer_params": peer["params"], "peer": peer["peer"], "peer_version": peer["version"],
        "torch": peer["torch"], "peer_threads": peer["threads"], "ours_platform": mine["platform"],
    }), flush=True)


if __name__ == "__main__":
    main()
