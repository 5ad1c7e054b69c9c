"""The bench's results: rows from the workers' timings, the targets, the printout, the plot.

The targets are the contract's (docs/guide/contract.md, Performance targets):
the page lists each target's text as `format_targets` prints it.

A row is one case, dtype and pass. Its ratios:

- vs_numpy = numpy / fastbn and vs_torch = torch / fastbn, every peer
  allocating its outputs;
- vs_roofline = fastbn-out / roofline, where the roofline of a pass is the
  sum of its kernels' times (`ROOFLINE_OF_PASS`): R + RW for train forward,
  RW for eval, R2 + R2W for backward;
- gbps, fastbn-out's effective bandwidth: x, y, dy and dx counted once each
  (`ARRAYS_MOVED` times the data's bytes) over its time.
"""

import glob
import math
import os
import platform
import subprocess
import sys

import fastbn
from fastbn.bench.cold import format_cold_start
from fastbn.bench.peers import ARRAYS_MOVED, LAYOUTS, PASSES, ROOFLINE_FORMS, ROOFLINE_OF_PASS
from fastbn.kernels import rows as rows_kernels

MiB = 1 << 20
# The contract's limits on fastbn-out / roofline for data over 8 MiB.
ROOFLINE_LIMITS = {"train": 1.15, "eval": 1.1, "backward": 1.15}
L2_ASSUMED = 256 * 1024  # when the machine does not say
BROKEN_BELOW = 0.9  # fastbn-out / floor under this means the floor is no floor
# The contract's limits on the small (64, 128) float32 calls, medians in microseconds.
SMALL_LIMITS_US = {
    "functional train forward": 5,
    "functional eval forward": 4,
    "functional backward": 6,
    "layer forward + backward": 12,
}


def best_times(records):
    """Each call's best median over thread counts.

    Returns
    -------
    dict
        call -> {"seconds", "threads", "by_threads": {threads: seconds}}.
    """
    best = {}
    for r in records:
        b = best.setdefault(r["call"], {"seconds": math.inf, "threads": None, "by_threads": {}})
        b["by_threads"][str(r["threads"])] = r["median"]
        if r["median"] < b["seconds"]:
            b.update(seconds=r["median"], threads=r["threads"])
    return best


def floors(roofline_times):
    """Each roofline kernel's floor: the fastest of its forms (`ROOFLINE_FORMS`), and which."""
    result = {}
    for kernel, forms in ROOFLINE_FORMS.items():
        form = min(forms, key=lambda f: roofline_times[f]["seconds"])
        result[kernel] = {**roofline_times[form], "form": form}
    return result


def case_rows(case, dtype, records):
    """The rows (one per pass) of one case and dtype from each peer's timing records."""
    best = {peer: best_times(peer_records) for peer, peer_records in records.items()}
    roofline = floors(best.pop("roofline"))
    nbytes = case.nbytes(dtype)
    rows = []
    for p in PASSES:
        seconds = {peer: b[p]["seconds"] for peer, b in best.items()}
        roof = sum(roofline[k]["seconds"] for k in ROOFLINE_OF_PASS[p])
        rows.append(
            {
                "case": case.label,
                **case.to_json(),
                "dtype": dtype,
                "nbytes": nbytes,
                "pass": p,
                "seconds": seconds,
                "threads": {peer: b[p]["threads"] for peer, b in best.items()},
                "by_threads": {peer: b[p]["by_threads"] for peer, b in best.items()},
                "roofline_kernels": roofline,
                "roofline": roof,
                "gbps": ARRAYS_MOVED[p] * nbytes / seconds["fastbn-out"] / 1e9,
                "vs_numpy": seconds["numpy"] / seconds["fastbn"],
                "vs_torch": seconds["torch"] / seconds["fastbn"] if "torch" in seconds else None,
                "vs_roofline": seconds["fastbn-out"] / roof,
            }
        )
    return rows


# --- the machine --------------------------------------------------------------------


def cpu_model():
    """lscpu's model name, else platform.processor(), else "unknown"."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        out = ""
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def l2_bytes():
    """The L2 cache of one core in bytes, from Linux's sysfs; None if it does not say."""
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(f"{index}/level") as f:
                level = f.read().strip()
            with open(f"{index}/size") as f:
                size = f.read().strip()
        except OSError:
            continue
        if level == "2":
            units = {"K": 1 << 10, "M": 1 << 20}
            return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
    return None


def machine_info(workers, settings):
    """The machine, the versions and the threads, merged from the workers' answers."""
    info = {
        "fastbn": fastbn.__version__,
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "l2_bytes": l2_bytes(),
        "max_threads": max(settings.threads),
    }
    for answer in workers.values():
        info.update(answer)
    return info


# --- the contract's targets ---------------------------------------------------------


def label(row):
    return f"{row['case']} {row['dtype']} {row['pass']}"


def in_mid_range(row):
    return MiB <= row["nbytes"] <= 8 * MiB


def is_large(row):
    return row["nbytes"] > 8 * MiB


def target(text, met, measured):
    return {"target": text, "met": met, "measured": measured}


def worst_row(text, rows, value, goal, limit):
    """A target on every chosen row: the worst row's value against the limit."""
    rows = [r for r in rows if value(r) is not None]
    if not rows:
        return target(f"{text} {goal} {limit}x", None, "not measured in this run")
    row = (min if goal == ">=" else max)(rows, key=value)
    v = value(row)
    met = v >= limit if goal == ">=" else v <= limit
    return target(f"{text} {goal} {limit}x", met, f"worst {v:.2f}x ({label(row)})")


def floor_row(text, rows, value, limit):
    """A roofline target: worst_row, unless fastbn beats a floor by more than 10%.

    A floor that fastbn beats is not a floor: the yardstick is broken, and the
    target is reported as such instead of MET.
    """
    rows = [r for r in rows if value(r) is not None]
    if rows:
        row = min(rows, key=value)
        if value(row) < BROKEN_BELOW:
            return target(
                f"{text} <= {limit}x",
                "broken",
                f"fastbn-out at {value(row):.2f}x of its floor ({label(row)}): not a floor",
            )
    return worst_row(text, rows, value, "<=", limit)


def torch_geomean(rows):
    ratios = [r["vs_torch"] for r in rows if r["vs_torch"] is not None]
    text = "vs PyTorch, geometric mean over the table >= 1.5x"
    if not ratios:
        return target(text, None, "not measured in this run")
    g = math.exp(sum(map(math.log, ratios)) / len(ratios))
    return target(text, g >= 1.5, f"{g:.2f}x over {len(ratios)} rows")


def few_features(rows, max_threads):
    """(2, 4194304) float32: fastest at every thread, and within the roofline limits."""
    text = f"(2, 4194304) float32: best at {max_threads} threads, within the roofline limits"
    rows = [r for r in rows if r["name"] == "2x4194304" and r["dtype"] == "float32"]
    if not rows:
        return target(text, None, "not measured in this run")
    lowest = min(rows, key=lambda r: r["vs_roofline"])
    if lowest["vs_roofline"] < BROKEN_BELOW:
        return target(
            text,
            "broken",
            f"fastbn-out at {lowest['vs_roofline']:.2f}x of its floor ({label(lowest)}): "
            "not a floor",
        )
    threads = sorted({r["threads"]["fastbn-out"] for r in rows})
    row = max(rows, key=lambda r: r["vs_roofline"] / ROOFLINE_LIMITS[r["pass"]])
    met = threads == [max_threads] and all(
        r["vs_roofline"] <= ROOFLINE_LIMITS[r["pass"]] for r in rows
    )
    measured = (
        f"best at {'/'.join(map(str, threads))} threads; worst {row['vs_roofline']:.2f}x"
        f" of {ROOFLINE_LIMITS[row['pass']]}x ({label(row)})"
    )
    return target(text, met, measured)


def read_once(row, l2):
    """Whether training reads the row's data from memory once: features-first, each
    feature's values in L2, by the rows kernels' own rule (`rows.FEATURE_BYTES`,
    `rows.FEATURE_UNITS`): its statistics, then its output from cache. Then RW
    (R2W) is its floor, not R + RW; a longer row that would fit in a large L2 is
    still read twice.
    """
    n_features = row["shape"][0]
    feature_bytes = row["nbytes"] // n_features
    limit = min(l2, rows_kernels.FEATURE_BYTES)
    return (
        row["layout"] == "ff"
        and n_features >= rows_kernels.FEATURE_UNITS
        and feature_bytes <= limit
    )


def rows_in_l2(rows, l2):
    """Features-first rows over 8 MiB that training reads once (`read_once`)."""
    return [r for r in rows if is_large(r) and read_once(r, l2)]


def streamed_rows(rows, l2):
    """Rows over 8 MiB read from memory twice in training: all but `rows_in_l2`."""
    return [r for r in rows if is_large(r) and not read_once(r, l2)]


def floor_seconds(l2):
    """A row's floor, in seconds: R + RW (R2 + R2W), or RW (R2W) for rows read once."""
    once = {"train": "RW", "backward": "R2W"}

    def seconds(r):
        if r["pass"] in once and read_once(r, l2):
            return r["roofline_kernels"][once[r["pass"]]]["seconds"]
        return r["roofline"]

    return seconds


def floor_ratio(l2):
    """fastbn-out over its floor (`floor_seconds`): what the targets and the /roof column use."""
    floor = floor_seconds(l2)
    return lambda r: r["seconds"]["fastbn-out"] / floor(r)


def kernel_ratio(kernel):
    return lambda r: r["seconds"]["fastbn-out"] / r["roofline_kernels"][kernel]["seconds"]


def small_target(text, small, call, limit_us):
    seconds = small[call]["seconds"]
    return target(
        f"{text} <= {limit_us} us",
        seconds <= limit_us * 1e-6,
        f"{seconds * 1e6:.1f} us median ({thread_text(small[call]['threads'])})",
    )


def evaluate_targets(results):
    """The contract's targets, each MET (True), NOT MET (False) or not measured (None)."""
    rows = results["rows"]
    l2 = results["machine"]["l2_bytes"] or L2_ASSUMED
    train_bwd = [r for r in rows if r["pass"] in ("train", "backward")]
    large = [r for r in rows if is_large(r)]
    mid = [r for r in rows if in_mid_range(r)]
    in_l2 = rows_in_l2(rows, l2)
    streamed = streamed_rows(rows, l2)
    once_kib = min(l2, rows_kernels.FEATURE_BYTES) // 1024

    def of_pass(chosen, p):
        return [r for r in chosen if r["pass"] == p]

    def vs_roofline(r):
        return r["vs_roofline"]

    cold = results["cold_start"]["warm_cache"]["total"]
    return [
        worst_row(
            "vs NumPy, train fwd and bwd, 1-8 MiB",
            [r for r in train_bwd if in_mid_range(r)],
            lambda r: r["vs_numpy"],
            ">=",
            10,
        ),
        worst_row(
            "vs NumPy, train fwd and bwd, > 8 MiB",
            [r for r in train_bwd if is_large(r)],
            lambda r: r["vs_numpy"],
            ">=",
            6,
        ),
        worst_row("vs PyTorch, every row", rows, lambda r: r["vs_torch"], ">=", 1.0),
        torch_geomean(rows),
        floor_row("> 8 MiB, train / (R + RW)", of_pass(streamed, "train"), vs_roofline, 1.15),
        floor_row(
            "> 8 MiB, backward / (R2 + R2W)", of_pass(streamed, "backward"), vs_roofline, 1.15
        ),
        floor_row("> 8 MiB, eval / RW", of_pass(large, "eval"), vs_roofline, 1.1),
        floor_row(
            f"ff > 8 MiB, rows in L2 (<= {once_kib} KiB), train / RW",
            of_pass(in_l2, "train"),
            kernel_ratio("RW"),
            1.25,
        ),
        floor_row(
            f"ff > 8 MiB, rows in L2 (<= {once_kib} KiB), backward / R2W",
            of_pass(in_l2, "backward"),
            kernel_ratio("R2W"),
            1.25,
        ),
        floor_row(
            "1-8 MiB, train / (R + RW), RW where read once",
            of_pass(mid, "train"),
            floor_ratio(l2),
            2.0,
        ),
        floor_row(
            "1-8 MiB, backward / (R2 + R2W), R2W where read once",
            of_pass(mid, "backward"),
            floor_ratio(l2),
            2.0,
        ),
        few_features(rows, results["machine"]["max_threads"]),
        *(
            small_target(f"(64, 128) float32, {call}", results["small"], call, limit_us)
            for call, limit_us in SMALL_LIMITS_US.items()
        ),
        target(
            "cold start, warm compile cache <= 1.0 s",
            cold <= 1.0,
            f"{cold:.3f} s (empty cache: {results['cold_start']['empty_cache']['total']:.1f} s)",
        ),
    ]


# --- the printout -------------------------------------------------------------------


def format_time(seconds):
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f}us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f}ms"
    return f"{seconds:.3f}s"


def thread_text(n):
    return "1 thread" if n == 1 else f"{n} threads"


def format_ratio(ratio):
    return "-" if ratio is None else f"{ratio:.2f}x"


def format_header(results):
    m = results["machine"]
    s = results["settings"]
    l2 = f"L2 {m['l2_bytes'] // 1024} KiB per core" if m["l2_bytes"] else "L2 unknown"
    torch = (
        f", torch {m['torch']} ({m['torch_threads']} threads by default)"
        if "torch" in m
        else ", torch not installed"
    )
    threads = ", ".join(map(str, s["threads"]))
    return "\n".join(
        [
            f"fastbn {m['fastbn']} benchmark: all times are MEDIANS of repeated calls"
            f" (one warm-up call, then >= {s['budget']} s and >= {s['min_runs']} calls each)",
            f"machine: {m['cpu_count']} CPUs ({m['cpu_model']}, {l2}); python {m['python']},"
            f" numpy {m['numpy']}, numba {m['numba']} (threading layer {m['threading_layer']},"
            f" {m['numba_threads']} threads){torch}",
            f"threads: each peer at its best of {threads} (column thr: fastbn's/torch's);"
            f" each peer in a subprocess of its own (the roofline in fastbn-out's, on its"
            f" arrays), the peers of a case back to back;"
            f" run took {s['seconds']:.0f} s",
            "layouts: " + "; ".join(f"{k} = {v}" for k, v in LAYOUTS.items()),
            "  (torch gets ff data as the (1, n, m) view, nhwc as the channels_last"
            " (N, C, H, W) view, of the same memory)",
            "GB/s: fastbn-out's, x, y, dy, dx counted once each: train and eval move"
            " 2x the data's bytes, backward 3x (1 GB = 1e9 bytes)",
            "xNumPy = numpy / fastbn, xTorch = torch / fastbn (all allocating outputs);"
            " /roof = fastbn-out / roofline, the roofline being R + RW (train), RW (eval),"
            " R2 + R2W (backward); RW (train) and R2W (backward) for features-first rows"
            " read from memory once (each feature in L2), as the targets hold them",
        ]
    )


COLUMNS = (
    ("case", "<18"),
    ("dtype", "<7"),
    ("MiB", ">7"),
    ("pass", "<8"),
    ("fastbn", ">9"),
    ("fastbn-out", ">10"),
    ("numpy", ">9"),
    ("torch", ">9"),
    ("roofline", ">9"),
    ("GB/s", ">6"),
    ("xNumPy", ">7"),
    ("xTorch", ">6"),
    ("/roof", ">6"),
    ("thr", ">4"),
)


def table_cells(row, floor=lambda r: r["roofline"]):
    """A row's cells; floor gives its floor in seconds (`floor_seconds`), the targets' one."""
    seconds = row["seconds"]
    threads = row["threads"]
    return (
        row["case"],
        row["dtype"],
        f"{row['nbytes'] / MiB:.2f}",
        row["pass"],
        format_time(seconds["fastbn"]),
        format_time(seconds["fastbn-out"]),
        format_time(seconds["numpy"]),
        format_time(seconds.get("torch")),
        format_time(floor(row)),
        f"{row['gbps']:.1f}",
        format_ratio(row["vs_numpy"]),
        format_ratio(row["vs_torch"]),
        format_ratio(seconds["fastbn-out"] / floor(row)),
        f"{threads['fastbn']}/{threads.get('torch', '-')}",
    )


def format_line(cells, columns=COLUMNS):
    return " ".join(f"{cell:{spec}}" for cell, (_, spec) in zip(cells, columns, strict=True))


def format_table(rows, columns=COLUMNS, cells=table_cells):
    """One line per row (``cells(row)`` under ``columns``), a blank line between cases."""
    head = format_line([name for name, _ in columns], columns)
    lines = [head, "-" * len(head)]
    for i, row in enumerate(rows):
        if i and (row["case"], row["dtype"]) != (rows[i - 1]["case"], rows[i - 1]["dtype"]):
            lines.append("")
        lines.append(format_line(cells(row), columns))
    return "\n".join(lines)


def format_small(small):
    return "\n".join(
        f"small (64, 128) float32, {call}: {format_time(t['seconds'])} median"
        f" ({thread_text(t['threads'])})"
        for call, t in small.items()
    )


# The targets' heading: the page and section that state them.
TARGETS_HEADING = "Targets (docs/guide/contract.md, Performance targets):"


def format_targets(targets):
    status = {True: "MET", False: "NOT MET", None: "-", "broken": "BROKEN"}
    width = max(len(t["target"]) for t in targets)
    lines = [TARGETS_HEADING]
    for t in targets:
        lines.append(f"  {status[t['met']]:<8} {t['target']:<{width}}  {t['measured']}")
    return "\n".join(lines)


def format_report(results):
    floor = floor_seconds(results["machine"]["l2_bytes"] or L2_ASSUMED)
    return "\n\n".join(
        [
            format_header(results),
            format_table(results["rows"], cells=lambda row: table_cells(row, floor)),
            format_small(results["small"]),
            format_cold_start(results["cold_start"]),
            format_targets(results["targets"]),
        ]
    )


# --- the plot -----------------------------------------------------------------------


def plot(rows, path):
    """Effective GB/s against the data's bytes, one panel per pass, a series per peer."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "--plot: matplotlib is not installed, so no plot was written (pip install matplotlib)",
            file=sys.stderr,
        )
        return
    peers = list(rows[0]["seconds"])
    fig, axes = plt.subplots(1, len(PASSES), figsize=(6 * len(PASSES), 4.5), sharey=True)
    for ax, p in zip(axes, PASSES, strict=True):
        pass_rows = sorted((r for r in rows if r["pass"] == p), key=lambda r: r["nbytes"])

        def gbps(row, seconds, p=p):
            return ARRAYS_MOVED[p] * row["nbytes"] / seconds / 1e9

        for peer in peers:
            sizes = [r["nbytes"] for r in pass_rows]
            ax.plot(sizes, [gbps(r, r["seconds"][peer]) for r in pass_rows], "o", label=peer)
        ax.plot(
            [r["nbytes"] for r in pass_rows],
            [gbps(r, r["roofline"]) for r in pass_rows],
            "k_",
            markersize=14,
            label="roofline",
        )
        ax.set_xscale("log")
        ax.set_title(f"{p} ({' + '.join(ROOFLINE_OF_PASS[p])})")
        ax.set_xlabel("data size (bytes)")
    axes[0].set_ylabel("effective GB/s (x, y, dy, dx once each)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot written to {path}", file=sys.stderr)
