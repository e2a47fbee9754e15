"""VAR's scaling law in miniature: test loss against parameters for five 2-layer VARs trained alike.

Five widths (16 to 64: about 17k to 186k parameters), the same 300 steps from the same seed on 10,000 MNIST
training digits, test loss on 500 held-out digits; a least-squares line through log(loss) vs log(params)
(VAR's paper: correlation -0.998). Chapter 04 shows this result next to a smaller run made live.

Writes ``benchmarks/results/var_scaling.json`` and ``var_scaling.png``::

    python benchmarks/bench_var_scaling.py            # about 1.5 CPU minutes on 2 cores
    python benchmarks/bench_var_scaling.py --steps 600 --widths 16 32 64 128
    python benchmarks/bench_var_scaling.py --out /tmp/scaling   # write there: the committed result stays
"""

from __future__ import annotations

import datetime
import io
import json
import platform
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ar_course import cli  # noqa: E402
from ar_course.files import atomic_write_bytes, atomic_write_text  # noqa: E402
from ar_course.var import load_pretrained  # noqa: E402
from ar_course.var.scaling import scaling_study  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def plot(study: dict) -> plt.Figure:
    """Test loss against parameters, log-log, with the fitted power law."""
    params = np.array(study["params"], dtype=float)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.loglog(params, study["test_loss"], "o", label="2-layer VARs, equal steps")
    ax.loglog(params, np.exp(study["intercept"]) * params ** study["slope"], "--",
              label=f"fit: slope {study['slope']:.3f}, correlation {study['correlation']:.4f}")
    ax.set(xlabel="parameters", ylabel="test loss (nats/token)", title="VAR mini scaling study (paper: -0.998)")
    # ticks at the measured points, plain numbers: matplotlib's log-axis labels ran together ("3x10^4 4x10^4")
    ax.set_xticks(params, [f"{p / 1e3:.0f}k" for p in params])
    ax.set_yticks(study["test_loss"], [f"{v:.2f}" for v in study["test_loss"]])
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_minor_formatter(NullFormatter())
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=cli.positive_int, nargs="+", default=[16, 24, 32, 48, 64],
                        help="model widths (even)")
    parser.add_argument("--steps", type=cli.positive_int, default=300, help="training steps of every model [300]")
    parser.add_argument("--threads", type=cli.positive_int, default=2, help="torch CPU threads [2]")
    parser.add_argument("--out", type=cli.path_arg, default=RESULTS,
                        help="folder for var_scaling.json and .png, created if missing [benchmarks/results]")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_pretrained()
    study = scaling_study(tokenizer, model.config, args.widths, steps=args.steps)
    first, last = study["test_loss"][0], study["test_loss"][-1]
    summary = [{"what": f"VAR mini scaling study: {len(args.widths)} 2-layer VARs, {study['params'][0] / 1e3:.0f}k-"
                        f"{study['params'][-1] / 1e3:.0f}k parameters, {args.steps} steps each",
                "measured": f"test loss {first:.2f} -> {last:.2f} nats/token; log-log slope {study['slope']:.3f}, "
                            f"correlation {study['correlation']:.4f}",
                "target": "a power law (paper: -0.998)", "met": study["correlation"] < -0.95}]
    result = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
              "threads": args.threads, "torch": torch.__version__, "steps": args.steps, **study, "summary": summary}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "var_scaling.json", json.dumps(result, indent=2))
    png = io.BytesIO()
    plot(study).savefig(png, format="png", dpi=120)
    atomic_write_bytes(args.out / "var_scaling.png", png.getvalue())
    print(summary[0]["measured"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
