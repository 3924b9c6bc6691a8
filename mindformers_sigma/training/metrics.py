"""What a user sees while training: peak probe, progress line, metrics.jsonl, loss curve."""

from __future__ import annotations

import json
import os
import time
from typing import Callable, Dict, List, Optional

import numpy as np

from mindformers_sigma.atomic import atomic_file, write_bytes_atomic


def measure_matmul_peak(seconds: float = 1.0, size: int = 1024) -> float:
    """Sustained fp32 matmul FLOP/s of this machine: ~``seconds`` of back-to-back products, half
    with MindSpore and half with numpy; the faster library's average rate wins.  (A single
    short product can beat the sustained rate where the CPU quota is enforced over time.)"""
    import mindspore as ms
    from mindspore import ops

    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    ta, tb = ms.Tensor(a), ms.Tensor(b)
    flop = 2.0 * size ** 3
    rates = []
    for run in (lambda: ops.matmul(ta, tb).asnumpy(), lambda: np.matmul(a, b)):
        run()  # warm-up
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 2:
            run()
            count += 1
        rates.append(flop * count / (time.perf_counter() - start))
    return max(rates)


def _step_of(line: str) -> Optional[int]:
    """The step of one metrics line, or None for a line that a crash cut short (or that is not ours)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else None


class MetricsLog:
    """Appends one JSON object per step to ``metrics.jsonl``.

    On resume the file is cut back to the checkpoint's step first (atomically), dropping the
    steps that will be redone and any line cut short by a crash mid-write.
    """

    def __init__(self, path: Optional[str], resume_step: int = 0, log: Callable[[str], None] = print):
        self.path = path
        if path is None or not os.path.isfile(path):
            return
        with open(path, "rb") as handle:
            lines = handle.read().decode("utf-8", errors="replace").splitlines(keepends=True)
        steps = [_step_of(line) for line in lines]
        kept = [line if line.endswith("\n") else line + "\n"
                for line, step in zip(lines, steps) if step is not None and step <= resume_step]
        unreadable = sum(step is None and bool(line.strip()) for line, step in zip(lines, steps))
        if unreadable:
            log(f"metrics: dropped {unreadable} unreadable line(s) of {path} (a write cut short by a crash)")
        write_bytes_atomic(path, "".join(kept).encode("utf-8"))

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def format_eta(seconds: Optional[float]) -> str:
    """h:mm:ss, or '?' before any step has run on an already compiled graph."""
    if seconds is None:
        return "?"
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def progress_line(record: dict, total_steps: int, domain_names: List[str]) -> str:
    per_domain = " ".join(f"{name}={record['domain_loss'][name]:.3f}" for name in domain_names
                          if record["domain_loss"].get(name) is not None)
    skipped = "  SKIPPED (overflow)" if not record["finite"] else ""
    loads = record.get("ecss_slab_loads", 1)
    ecss = (f"  ecss experts {'+'.join(str(n) for n in record['ecss_active_experts'])}"
            f"{f' in {loads} slab loads' if loads > 1 else ''} h2d {record['ecss_h2d_bytes'] / 2 ** 20:.1f} MiB"
            if "ecss_active_experts" in record else "")
    return (f"step {record['step']:>6}/{total_steps}  loss {record['loss']:.4f}  [{per_domain}]  "
            f"lr {record['lr']:.2e}  scale {record['loss_scale']:g}  tok/s {record['tokens_per_second']:,.0f}  "
            f"mfu {record['mfu']:.3f}  eta {format_eta(record['eta_seconds'])}{ecss}{skipped}")


def domain_losses(nll: np.ndarray, tokens: np.ndarray, names: List[str]) -> Dict[str, Optional[float]]:
    return {name: (float(nll[i] / tokens[i]) if tokens[i] > 0 else None) for i, name in enumerate(names)}


def plot_losses(metrics_path: str, out_png: str) -> bool:
    """Loss curve picture if matplotlib is importable (an optional extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    with open(metrics_path, encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(out_png) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return True
