"""`make mutation`: mutation testing of the pure modules with cosmic-ray, scored, survivors printed.

Each module is mutated in a scratch copy of the tree (.cache/mutation/<module>/), never in the work tree,
and only its own unit tests run against each mutant, with a per-mutant timeout of five baseline runs (at
least 20 s): a mutant that loops forever counts as killed. Mutants listed in hack/mutation-equivalents.txt
(equivalent mutants and whole operator families, one line of reason each) are skipped and left out of the
score. Usage: `python -m hack.mutation [MODULE ...]`; no MODULE: the pure modules changed against main;
`all`: every pure module.
"""

from __future__ import annotations

import argparse
import fnmatch
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRATCH = ROOT / ".cache" / "mutation"
EQUIVALENTS = ROOT / "hack" / "mutation-equivalents.txt"
GOAL = 85.0

ALGORITHM_TESTS = ("tests/operator/test_autoscaler_algorithm.py", "tests/operator/test_autoscaler_pins.py")
# Each pure module and the pytest arguments selecting its own unit tests (the only tests run against its
# mutants): paths, and `-k` where a module's tests share a file with others.
PURE_MODULES: dict[str, tuple[str, ...]] = {
    "runtime/modelfleet_runtime/batching.py": ("tests/runtime/test_batching.py",),
    "operator/modelfleet_operator/autoscaler/split.py": ("tests/operator/test_autoscaler_algorithm.py", "-k", "split"),
    "operator/modelfleet_operator/autoscaler/metrics.py": (
        "tests/operator/test_autoscaler_metrics_pins.py",
        "tests/operator/test_autoscaler_metrics.py",
    ),
    "operator/modelfleet_operator/autoscaler/algorithm.py": ALGORITHM_TESTS,
    "operator/modelfleet_operator/autoscaler/behavior.py": ALGORITHM_TESTS,
    "runtime/modelfleet_runtime/build/options.py": ("tests/runtime/test_build_options.py",),
    "runtime/modelfleet_runtime/build/key.py": ("tests/runtime/test_build_options.py",),
    "operator/modelfleet_operator/reconcile.py": ("tests/operator/test_reconcile.py",),
    "operator/modelfleet_operator/placement.py": ("tests/operator/test_placement.py",),
    "operator/modelfleet_operator/resources.py": (
        "tests/operator/test_resources.py",
        "tests/operator/test_reconcile.py",
    ),
}


@dataclass(frozen=True)
class Exclusion:
    """One line of the equivalents file: a module (or `*`), an optional line, an operator pattern, why."""

    module: str
    line: int | None
    operator: str
    reason: str

    def matches(self, module: str, line: int, operator: str) -> bool:
        return (
            self.module in ("*", module)
            and (self.line is None or self.line == line)
            and fnmatch.fnmatchcase(operator, self.operator)
        )


def read_exclusions(path: Path = EQUIVALENTS) -> list[Exclusion]:
    """`<module>[:<line>] <operator pattern> <reason>` per line; `#` starts a comment line."""
    out = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        parts = text.split(maxsplit=2)
        if len(parts) < 3:
            raise SystemExit(f"{path}:{number}: want '<module>[:<line>] <operator> <reason>', got {raw!r}")
        where, operator, reason = parts
        module, _, line = where.partition(":")
        out.append(Exclusion(module, int(line) if line else None, operator, reason))
    return out


def changed_modules() -> list[str]:
    """Pure modules that differ from main (committed on this branch or not)."""
    committed = _git("diff", "--name-only", "main...HEAD")
    uncommitted = _git("diff", "--name-only", "HEAD")
    changed = set(committed.split()) | set(uncommitted.split())
    return [m for m in PURE_MODULES if m in changed]


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout


def _scratch_tree(module: str) -> Path:
    """A copy of what the tests import, so a mutant never touches the work tree."""
    tree = SCRATCH / Path(module).stem
    shutil.rmtree(tree, ignore_errors=True)
    for part in ("operator", "runtime", "tests", "pyproject.toml"):
        source = ROOT / part
        if source.is_dir():
            shutil.copytree(source, tree / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, tree / part)
    return tree


def _test_command(module: str) -> str:
    # PYTHONPATH puts the copy's packages ahead of the editable install (which points at the work tree).
    tests = " ".join(PURE_MODULES[module])
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
        f"test-command = '{command}'\n"
        "[cosmic-ray.distributor]\n"
        'name = "local"\n'
    )
    return config


def _skip_excluded(session: Path, module: str, exclusions: list[Exclusion]) -> int:
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    skipped = 0
    with use_db(str(session), WorkDB.Mode.open) as db:
        for item in list(db.pending_work_items):
            for mutation in item.mutations:
                line = mutation.start_pos[0]
                hit = next((e for e in exclusions if e.matches(module, line, mutation.operator_name)), None)
                if hit is not None:
                    result = WorkResult(worker_outcome=WorkerOutcome.SKIPPED, output=f"excluded: {hit.reason}")
                    db.set_result(item.job_id, result)
                    skipped += 1
                    break
    return skipped


@dataclass(frozen=True)
class Score:
    module: str
    killed: int
    survived: int
    skipped: int
    timeouts: int
    survivors: tuple[str, ...]

    @property
    def percent(self) -> float:
        tested = self.killed + self.survived
        return 100.0 * self.killed / tested if tested else 100.0


def _score(session: Path, module: str) -> Score:
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome

    killed = survived = skipped = timeouts = 0
    survivors = []
    with use_db(str(session), WorkDB.Mode.open) as db:
        for item, result in db.completed_work_items:
            if result.worker_outcome is WorkerOutcome.SKIPPED:
                skipped += 1
            elif result.test_outcome is TestOutcome.SURVIVED:
                survived += 1
                mutation = item.mutations[0]
                survivors.append(f"{module}:{mutation.start_pos[0]} {mutation.operator_name}\n{result.diff or ''}")
            else:
                killed += 1
                timeouts += result.output == "timeout"
    return Score(module, killed, survived, skipped, timeouts, tuple(survivors))


def run_module(module: str, exclusions: list[Exclusion]) -> Score:
    """Init a session in a scratch tree, skip the listed equivalents, run every mutant, score it."""
    tree = _scratch_tree(module)
    command = _test_command(module)
    timeout = max(20.0, 5 * _baseline(tree, command))
    config = _write_config(tree, module, command, timeout)
    session = tree / "session.sqlite"
    cosmic = [str(Path(sys.executable).parent / "cosmic-ray"), "--verbosity", "ERROR"]
    subprocess.run([*cosmic, "init", str(config), str(session)], cwd=tree, check=True)
    skipped = _skip_excluded(session, module, exclusions)
    print(f"{module}: per-mutant timeout {timeout:.0f} s, {skipped} excluded", flush=True)
    subprocess.run(["nice", "-n", "19", *cosmic, "exec", str(config), str(session)], cwd=tree, check=True)
    return _score(session, module)


def report(scores: list[Score]) -> None:
    for s in scores:
        for survivor in s.survivors:
            print(f"--- survived: {survivor}")
    print(f"\n{'module':58} {'score':>7} {'killed':>7} {'survived':>8} {'excluded':>8} {'timeouts':>8}")
    for s in scores:
        flag = "" if s.percent >= GOAL else f"  (below {GOAL:.0f} %)"
        print(
            f"{s.module:58} {s.percent:6.1f}% {s.killed:7} {s.survived:8} {s.skipped:8} {s.timeouts:8}{flag}",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("modules", nargs="*", help="pure module paths; none: those changed against main; all: all")
    args = parser.parse_args(argv)
    modules = list(PURE_MODULES) if args.modules == ["all"] else (args.modules or changed_modules())
    unknown = [m for m in modules if m not in PURE_MODULES]
    if unknown:
        raise SystemExit(f"not a pure module: {', '.join(unknown)}; they are: {', '.join(PURE_MODULES)}")
    if not modules:
        print("no pure module differs from main; name one (MODULE=...) or MODULE=all")
        return 0
    exclusions = read_exclusions()
    scores = [run_module(m, exclusions) for m in modules]
    report(scores)
    return 0


if __name__ == "__main__":
    sys.exit(main())
