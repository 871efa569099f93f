"""Data preparation speed: tokens/s of `gptstack prepare` with one worker and with all cores, and peak memory.

The corpus is the bundled tinyshakespeare (1.1 MB) written --repeat times into a folder, one copy
per file, so that tokenizing (about 0.1 s a copy on one core) outlasts starting the workers (a few
tenths of a second). Each run is a fresh process calling `prepare` (the first pass, the
tokenizing, the checksums, starting the workers; not the interpreter's start-up) that reports its
wall time, the CPU time of it and its workers, its peak resident memory and that of its largest
worker. The fastest of --runs is kept. On a machine shared with other work the wall
time shows the share of the cores it got, and the CPU time what the work costs; the load average is
printed for that reason.

    python bench/prepare.py [--repeat 16] [--workers 1,2] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing.forkserver
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gptstack.data.prepare import default_workers, prepare
from machine import cpu_model   # bench/machine.py

CORPUS = Path(__file__).resolve().parents[1] / "src" / "gptstack" / "assets" / "corpus" / "tinyshakespeare.txt"


def measure(corpus: str, out: str, workers: int) -> None:
    """In the child process: prepare once, print seconds, tokens and peak memory as JSON."""
    started, cpu_before = time.perf_counter(), cpu_seconds(resource.RUSAGE_SELF)
    manifest = prepare([corpus], out, workers=workers, progress=False)
    multiprocessing.forkserver._forkserver._stop()   # the workers are its children: waited for, they count in ours
    print(json.dumps({"seconds": time.perf_counter() - started,
                      "cpu_seconds": cpu_seconds(resource.RUSAGE_SELF) - cpu_before + cpu_seconds(resource.RUSAGE_CHILDREN),
                      "tokens": sum(split["tokens"] for split in manifest["splits"].values()),
                      "main_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "worker_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))


def cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def run(corpus: Path, out: Path, workers: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--measure", str(corpus), str(out), str(workers)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=16, help="copies of tinyshakespeare in the corpus")
    parser.add_argument("--workers", default=f"1,{default_workers()}")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        corpus, out, workers = args.measure
        measure(corpus, out, int(workers))
        return

    text = CORPUS.read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        for i in range(args.repeat):
            (corpus / f"copy{i:03d}.txt").write_text(text, encoding="utf-8")
        megabytes = args.repeat * CORPUS.stat().st_size / 1e6
        print(f"machine: {cpu_model()}; Python {platform.python_version()}; load average {os.getloadavg()[0]:.1f}")
        print(f"corpus: tinyshakespeare x {args.repeat} ({megabytes:.1f} MB), best of {args.runs} runs\n")
        print("| workers | tokens | seconds | tokens/s | MB/s | CPU seconds | peak RSS, main process | peak RSS, largest worker |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for workers in (int(w) for w in args.workers.split(",")):
            runs = [run(corpus, Path(tmp) / f"out{workers}_{r}", workers) for r in range(args.runs)]
            best = min(runs, key=lambda r: r["seconds"])
            worker_rss = f"{max(r['worker_rss'] for r in runs) / 2**20:,.0f} MiB" if workers > 1 else "(no pool)"
            print(f"| {workers} | {best['tokens']:,} | {best['seconds']:.2f} | {best['tokens'] / best['seconds']:,.0f} | "
                  f"{megabytes / best['seconds']:.1f} | {best['cpu_seconds']:.2f} | "
                  f"{max(r['main_rss'] for r in runs) / 2**20:,.0f} MiB | {worker_rss} |")


if __name__ == "__main__":
    main()
