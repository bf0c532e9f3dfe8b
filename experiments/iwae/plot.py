"""Validation bound vs GPU time of the MNIST runs (IWAE table and sigmoid belief nets).

Reads each run's ``metrics.jsonl`` (``valid/valid_bound``: the k = 50 importance-weighted
bound on 1000 held-out training images) and places step s at GPU time s × (training
seconds / steps) of that run — the mean step time of the whole run, start-up and
compilation included where the driver measured it (``plan.json``: its training seconds over
the steps reached), else the harness's
``train/steps_per_s``. Writes ``experiments/iwae/bound_vs_gpu_time.png``.

    python experiments/iwae/plot.py          # needs matplotlib (experiment-only dependency)
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXP = HERE.parent

RUNS = [  # (label, run directory, line style)
    ("IWAE k=50, batch 100, 60k steps", HERE / "h200_k50_60k", "-"),
    ("IWAE k=50, batch 400, 125k steps", HERE / "h200_k50_b400_125k", "-"),
    ("IWAE k=50 (DReG), batch 400", HERE / "h200_k50_dreg_b400", "-"),
    ("IWAE k=50, batch 400, 10-min budget (128k steps)", HERE / "h200_k50_b400_10min", "-"),
    ("IWAE k=50 (DReG), batch 400, 10-min budget", HERE / "h200_k50_dreg_10min", "-"),
    ("IWAE k=5 (7 runs sharing the GPU)", HERE / "h200_rows" / "iwae_k5", "--"),
    ("VAE k=1 (shared GPU)", HERE / "h200_rows" / "vae_k1", "--"),
    ("VAE k=5 (shared GPU)", HERE / "h200_rows" / "vae_k5", "--"),
    ("VAE k=50 (shared GPU)", HERE / "h200_rows" / "vae_k50", "--"),
    ("SBN VIMCO K=5, 135k steps", EXP / "sbn" / "h200_vimco_k5_135k", "-"),
    ("SBN VIMCO K=5 (shared GPU)", EXP / "sbn" / "h200_rows" / "sbn_vimco_k5", ":"),
    ("SBN RWS K=5 (shared GPU)", EXP / "sbn" / "h200_rows" / "sbn_rws_k5", ":"),
    ("SBN NVIL (shared GPU)", EXP / "sbn" / "h200_rows" / "sbn_nvil", ":"),
]


def curve(run: Path) -> tuple[list[float], list[float]]:
    """(GPU minutes, −valid bound) of one run."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    plan = run / "plan.json"
    if plan.exists():
        p = json.loads(plan.read_text())
        reached = max((r["step"] for r in rows), default=p["steps"])  # a budget stop ends early
        sec_per_step = p["used_s"] / min(p["steps"], reached)
    else:
        rates = [r["train/steps_per_s"] for r in rows if "train/steps_per_s" in r]
        sec_per_step = 1.0 / rates[-1]
    pts = [(r["step"] * sec_per_step / 60.0, -r["valid/valid_bound"]) for r in rows if "valid/valid_bound" in r]
    return [t for t, _ in pts], [b for _, b in pts]


def main() -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, run, style in RUNS:
        if not (run / "metrics.jsonl").exists():
            continue
        t, b = curve(run)
        (a2 if "SBN" in label else a1).plot(t, b, style, marker=".", label=label)
    a1.axhline(86.0, color="k", lw=0.8, ls="--")
    a1.text(0.1, 86.1, "target 86.0 (test NLL)", fontsize=8)
    a1.set(title="Dynamically binarized MNIST, 1-layer VAE/IWAE (H200)", xlabel="GPU minutes",
           ylabel="−(k = 50 bound) on held-out training images, nats", ylim=(84, 105))
    a2.axhline(95.0, color="k", lw=0.8, ls="--")
    a2.text(0.1, 95.2, "VIMCO K=5 target 95 (test NLL)", fontsize=8)
    a2.set(title="Fixed-binarized MNIST, SBN 200-200-200 (H200)", xlabel="GPU minutes",
           ylabel="−(k = 50 bound), nats", ylim=(92, 130))
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    out = HERE / "bound_vs_gpu_time.png"
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    print(main())
