"""`make mutation`: mutation testing of the pure modules with cosmic-ray, scored, survivors printed.

Each module is mutated in a scratch copy of the tree (.cache/mutation/<module>/), never in the work tree,
and only its own unit tests run against each mutant, with a per-mutant timeout of five baseline runs (at
least 20 s): a mutant that loops forever counts as killed. Mutants listed in hack/mutation-equivalents.txt
(equivalent mutants and whole operator families, one line of reason each) are skipped and left out of the
score. Usage: `python -m hack.mutation [--sample N] [MODULE ...]`; no MODULE: the pure modules changed against
main; `all`: every pure module. `--sample N` runs a seeded random N of a module's mutants (for algorithm.py,
too big to run whole in one sitting) and prints the score's 95 % interval. `--again` reruns only the last
run's survivors against today's tests and equivalents, when the module itself has not changed since.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import math
import random
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRATCH = ROOT / ".cache" / "mutation"
EQUIVALENTS = ROOT / "hack" / "mutation-equivalents.txt"
GOAL = 85.0

# Less the two property tests (hypothesis, 4 s a run between them), which the pins cover rule by rule.
ALGORITHM_TESTS = (
    "tests/operator/test_autoscaler_algorithm.py",
    "tests/operator/test_autoscaler_pins.py",
    "tests/operator/test_autoscaler_algorithm_pins.py",
    "-k",
    "not more_load_never_means_fewer_replicas and not result_never_leaves_min_max",
)
# Each pure module and the pytest arguments selecting its own unit tests (the only tests run against its
# mutants): paths, and `-k` where a module's tests share a file with others.
PURE_MODULES: dict[str, tuple[str, ...]] = {
    "runtime/modelfleet_runtime/batching.py": ("tests/runtime/test_batching.py",),
    "operator/modelfleet_operator/autoscaler/split.py": ("tests/operator/test_autoscaler_algorithm.py", "-k", "split"),
    "operator/modelfleet_operator/autoscaler/metrics.py": (
        "tests/operator/test_autoscaler_metrics_pins.py",
        "tests/operator/test_autoscaler_metrics.py",
        "-k",
        "not scraper_tolerates_failures",  # sources.py's scrape over HTTP: 6 s of timeouts per mutant
    ),
    "operator/modelfleet_operator/autoscaler/algorithm.py": ALGORITHM_TESTS,
    "operator/modelfleet_operator/autoscaler/behavior.py": ALGORITHM_TESTS,
    "runtime/modelfleet_runtime/build/options.py": ("tests/runtime/test_build_options.py",),
    "runtime/modelfleet_runtime/build/key.py": ("tests/runtime/test_build_options.py",),
    "operator/modelfleet_operator/reconcile.py": (
        "tests/operator/test_reconcile.py",
        "tests/operator/test_reconcile_pins.py",
        "tests/operator/test_capacity.py",
        "tests/operator/test_labeled_gate.py",
        "tests/operator/test_grpc_ports.py",
    ),
    "operator/modelfleet_operator/placement.py": ("tests/operator/test_placement.py",),
    "operator/modelfleet_operator/resources.py": (
        "tests/operator/test_resources.py",
        "tests/operator/test_resources_pins.py",
        "tests/operator/test_reconcile.py",
    ),
}


@dataclass(frozen=True)
class Exclusion:
    """One line of the equivalents file: a module (or `*`), a line or a regex its text matches (optional),
    an operator pattern, why."""

    module: str
    line: int | None
    operator: str
    reason: str
    text: str | None = None

    def matches(self, module: str, line: int, operator: str, source: str = "") -> bool:
        return (
            self.module in ("*", module)
            and (self.line is None or self.line == line)
            and (self.text is None or re.search(self.text, source) is not None)
            and fnmatch.fnmatchcase(operator, self.operator)
        )


def read_exclusions(path: Path = EQUIVALENTS) -> list[Exclusion]:
    """`<module>[:<line>|~<regex>] <operator pattern> <reason>` per line; `#` starts a comment line."""
    out = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        parts = text.split(maxsplit=2)
        if len(parts) < 3:
            raise SystemExit(f"{path}:{number}: want '<module>[:<line>|~<regex>] <operator> <reason>', got {raw!r}")
        where, operator, reason = parts
        module, tilde, pattern = where.partition("~")
        module, _, line = module.partition(":")
        out.append(Exclusion(module, int(line) if line else None, operator, reason, pattern if tilde else None))
    return out


def changed_modules() -> list[str]:
    """Pure modules that differ from main (committed on this branch or not)."""
    committed = _git("diff", "--name-only", "main...HEAD")
    uncommitted = _git("diff", "--name-only", "HEAD")
    changed = set(committed.split()) | set(uncommitted.split())
    return [m for m in PURE_MODULES if m in changed]


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout


def _refresh_tree(tree: Path, *, fresh: bool = False) -> None:
    """Copy what the tests import, so a mutant never touches the work tree (`fresh`: the session too)."""
    if fresh:
        shutil.rmtree(tree, ignore_errors=True)
    for part in ("operator", "runtime", "tests", "pyproject.toml"):
        source, target = ROOT / part, tree / part
        if source.is_dir():
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, target)


def _test_command(module: str) -> str:
    # PYTHONPATH puts the copy's packages ahead of the editable install (which points at the work tree).
    tests = shlex.join(PURE_MODULES[module])
    return (
        f"env PYTHONPATH=operator:runtime:. {sys.executable} -m pytest -x -q --no-header -p no:cacheprovider "
        f"-o addopts= {tests}"
    )


def _baseline(tree: Path, command: str) -> float:
    start = time.monotonic()
    done = subprocess.run(command, check=False, shell=True, cwd=tree, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the unmutated tests fail in {tree}:\n{done.stdout[-3000:]}")
    return time.monotonic() - start


def _write_config(tree: Path, module: str, command: str, timeout: float) -> Path:
    config = tree / "cosmic-ray.toml"
    config.write_text(
        "[cosmic-ray]\n"
        f'module-path = "{module}"\n'
        f"timeout = {timeout:.0f}\n"
        "excluded-modules = []\n"
        f"test-command = {json.dumps(command)}\n"  # a TOML basic string: the command holds quotes
        "[cosmic-ray.distributor]\n"
        'name = "local"\n'
    )
    return config


def _skip_excluded(session: Path, module: str, exclusions: list[Exclusion]) -> int:
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    skipped = 0
    lines = (session.parent / module).read_text().splitlines()  # the scratch copy cosmic-ray mutates
    with use_db(str(session), WorkDB.Mode.open) as db:
        for item in list(db.pending_work_items):
            for mutation in item.mutations:
                line = mutation.start_pos[0]
                source = lines[line - 1] if 0 < line <= len(lines) else ""
                hit = next((e for e in exclusions if e.matches(module, line, mutation.operator_name, source)), None)
                if hit is not None:
                    result = WorkResult(worker_outcome=WorkerOutcome.SKIPPED, output=f"excluded: {hit.reason}")
                    db.set_result(item.job_id, result)
                    skipped += 1
                    break
    return skipped


def _sample(session: Path, size: int, seed: int) -> int:
    """Leave a seeded random `size` of the pending mutants to run and skip the others; returns how many."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    with use_db(str(session), WorkDB.Mode.open) as db:
        pending = sorted(item.job_id for item in db.pending_work_items)
        keep = set(random.Random(seed).sample(pending, min(size, len(pending))))
        for job_id in pending:
            if job_id not in keep:
                db.set_result(job_id, WorkResult(worker_outcome=WorkerOutcome.SKIPPED, output=UNSAMPLED))
    return len(pending) - len(keep)


UNSAMPLED = "not sampled"


@dataclass(frozen=True)
class Score:
    module: str
    killed: int
    survived: int
    skipped: int
    timeouts: int
    survivors: tuple[str, ...]
    unsampled: int = 0

    @property
    def percent(self) -> float:
        tested = self.killed + self.survived
        return 100.0 * self.killed / tested if tested else 100.0

    @property
    def interval(self) -> str:
        """The 95 % Wilson interval of a sampled score ('' when every mutant ran)."""
        n = self.killed + self.survived
        if not self.unsampled or not n:
            return ""
        p, z = self.killed / n, 1.96
        centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        low, high = (100 * (centre + sign * half) / (1 + z * z / n) for sign in (-1, 1))
        return f"  (sampled {n} of {n + self.unsampled}: 95 % {low:.0f}-{high:.0f} %)"


def _score(session: Path, module: str) -> Score:
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome

    killed = survived = skipped = timeouts = unsampled = 0
    survivors = []
    with use_db(str(session), WorkDB.Mode.open) as db:
        for item, result in db.completed_work_items:
            if result.worker_outcome is WorkerOutcome.SKIPPED and result.output == UNSAMPLED:
                unsampled += 1
            elif result.worker_outcome is WorkerOutcome.SKIPPED:
                skipped += 1
            elif result.test_outcome is TestOutcome.SURVIVED:
                survived += 1
                mutation = item.mutations[0]
                survivors.append(f"{module}:{mutation.start_pos[0]} {mutation.operator_name}\n{result.diff or ''}")
            else:
                killed += 1
                timeouts += result.output == "timeout"
    return Score(module, killed, survived, skipped, timeouts, tuple(survivors), unsampled)


def run_module(
    module: str, exclusions: list[Exclusion], sample: int | None = None, again: bool = False, seed: int = 0
) -> Score:
    """Init a session in a scratch tree, skip the listed equivalents, run every mutant (or a sample), score it.
    `again`: keep the last session of an unchanged module and rerun only its survivors, against today's tests."""
    tree = SCRATCH / Path(module).stem
    session, digest = tree / "session.sqlite", hashlib.sha256((ROOT / module).read_bytes()).hexdigest()
    if again and (tree / "module.sha256").is_file() and (tree / "module.sha256").read_text() == digest:
        _refresh_tree(tree)
        with sqlite3.connect(session) as db:
            db.execute("DELETE FROM work_results WHERE test_outcome = 'SURVIVED'")
        timeout = tomllib.loads((tree / "cosmic-ray.toml").read_text())["cosmic-ray"]["timeout"]
        config = _write_config(tree, module, _test_command(module), timeout)  # today's test list
    else:
        if again:
            print(f"{module}: no session of this version of the module to rerun: a fresh run", flush=True)
        _refresh_tree(tree, fresh=True)
        (tree / "module.sha256").write_text(digest)
        command = _test_command(module)
        timeout = max(20.0, 5 * _baseline(tree, command))
        config = _write_config(tree, module, command, timeout)
        subprocess.run([*COSMIC, "init", str(config), str(session)], cwd=tree, check=True)
    skipped = _skip_excluded(session, module, exclusions)
    unsampled = _sample(session, sample, seed) if sample is not None and not again else 0
    print(f"{module}: {skipped} more excluded, {unsampled} not sampled", flush=True)
    subprocess.run(["nice", "-n", "19", *COSMIC, "exec", str(config), str(session)], cwd=tree, check=True)
    return _score(session, module)


COSMIC = [str(Path(sys.executable).parent / "cosmic-ray"), "--verbosity", "ERROR"]


def report(scores: list[Score]) -> None:
    for s in scores:
        for survivor in s.survivors:
            print(f"--- survived: {survivor}")
    print(f"\n{'module':58} {'score':>7} {'killed':>7} {'survived':>8} {'excluded':>8} {'timeouts':>8}")
    for s in scores:
        flag = "" if s.percent >= GOAL else f"  (below {GOAL:.0f} %)"
        print(
            f"{s.module:58} {s.percent:6.1f}% {s.killed:7} {s.survived:8} {s.skipped:8} {s.timeouts:8}{flag}"
            f"{s.interval}",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("modules", nargs="*", help="pure module paths; none: those changed against main; all: all")
    parser.add_argument("--sample", type=int, help="run a seeded random sample of this many mutants per module")
    parser.add_argument("--seed", type=int, default=0, help="the sample's seed (a fresh sample after new tests)")
    parser.add_argument("--again", action="store_true", help="rerun only the last run's survivors (same module)")
    args = parser.parse_args(argv)
    modules = list(PURE_MODULES) if args.modules == ["all"] else (args.modules or changed_modules())
    unknown = [m for m in modules if m not in PURE_MODULES]
    if unknown:
        raise SystemExit(f"not a pure module: {', '.join(unknown)}; they are: {', '.join(PURE_MODULES)}")
    if not modules:
        print("no pure module differs from main; name one (MODULE=...) or MODULE=all")
        return 0
    exclusions = read_exclusions()
    scores = [run_module(m, exclusions, args.sample, args.again, args.seed) for m in modules]
    report(scores)
    return 0


if __name__ == "__main__":
    sys.exit(main())
