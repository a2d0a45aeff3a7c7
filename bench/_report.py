"""What every bench script shares: a plain-words description of the machine, and writing its own
section of docs/BENCHMARKS.md (between `<!-- NAME:start -->` and `<!-- NAME:end -->`) atomically."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADER = "# Benchmarks\n\nFigures written by the scripts in `bench/`; each script owns the section between its markers.\n"


def machine(with_torch: bool = True) -> str:
    """e.g. "2-core AMD EPYC (x86_64), no GPU; Python 3.11.7, torch 2.13.0+cpu"."""
    cpu = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
                break
    except OSError:
        pass
    gpu = "no GPU"
    if shutil.which("nvidia-smi"):
        r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.strip():
            gpu = r.stdout.strip().splitlines()[0]
    text = f"{os.cpu_count()}-core {cpu}, {gpu}; Python {platform.python_version()}"
    if with_torch:
        import torch

        text += f", torch {torch.__version__}"
    return text


def write_section(name: str, text: str, path: Path = ROOT / "docs/BENCHMARKS.md") -> None:
    """Replace only section `name` (create the file with a header if needed); temp file + rename.
    A hand-written reading of the figures, placed in the section after a `<!-- NAME:notes -->` line, is kept."""
    start, end, notes = f"<!-- {name}:start -->", f"<!-- {name}:end -->", f"<!-- {name}:notes -->"
    old = path.read_text(encoding="utf-8") if path.exists() else HEADER
    kept = ""
    if start in old and notes in old.split(start, 1)[1].split(end, 1)[0]:
        kept = "\n" + notes + old.split(start, 1)[1].split(end, 1)[0].split(notes, 1)[1].rstrip("\n")
    block = f"{start}\n{text}{kept}\n{end}"
    if start in old:
        new = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, old, flags=re.S)
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, path)


def run_cases(names: list[str], run_one, results: dict, json_path: Path, budget_s: float) -> None:
    """Run the benchmark cases one by one into results["cases"], rewriting `json_path` after each: a case that
    raises is recorded with its error and the others go on, and no case starts once `budget_s` seconds have
    passed (it is recorded as skipped). GPU memory is released between cases."""
    import gc
    import json
    import time
    import traceback

    import torch

    start = time.perf_counter()
    for name in names:
        if time.perf_counter() - start > budget_s:
            results["cases"].append({"case": name, "skipped": "time budget spent"})
            continue
        try:
            r = run_one(name)
        except Exception as e:  # one failing case must not hide the others' figures
            traceback.print_exc()
            r = {"case": name, "error": f"{type(e).__name__}: {str(e)[:500]}"}
        print(json.dumps(r), flush=True)
        results["cases"].append(r)
        json_path.write_text(json.dumps(results, indent=2))
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def case_args(name: str, cases: list[str], budget_s: float, smoke_help: str):
    """The command line every case-by-case GPU benchmark shares (--out, --cases, --budget-s, --json, --report,
    --smoke). With --report the args come back at once (no torch import: the caller writes the docs section);
    else args.out is a created directory and args.json the results file."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=f"/tmp/{name}", help="working directory")
    ap.add_argument("--cases", default=",".join(cases), help="comma-separated cases, run in this order")
    ap.add_argument("--budget-s", type=float, default=budget_s, help="start no new case after this many seconds")
    ap.add_argument("--json", help=f"results file (default OUT/{name}.json), rewritten after each case")
    ap.add_argument("--report", help="write docs/BENCHMARKS.md's section from this results file")
    ap.add_argument("--smoke", action="store_true", help=smoke_help)
    args = ap.parse_args()
    if args.report:
        return args
    import torch

    if not (torch.cuda.is_available() or args.smoke):
        raise SystemExit(f"{name} needs a CUDA device (or --smoke for a tiny case on any device)")
    args.out = Path(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    args.json = Path(args.json or args.out / f"{name}.json")
    return args


def unfinished_row(case: dict, columns: int) -> str | None:
    """A results table's row for a case that failed or was skipped (its reason in the last of `columns`
    cells), or None for a finished case, whose row the caller writes."""
    if "error" not in case and "skipped" not in case:
        return None
    return f"| {case['case']} |" + " |" * (columns - 2) + f" {case.get('error') or case.get('skipped')} |"
