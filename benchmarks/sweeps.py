"""What the coverage sweeps share (timm_coverage.py, torchvision_coverage.py,
transformers_coverage.py): a model's checks in a child process of its own, the short reason a
record keeps, and the evidence that names the limit a failure meets.

A sweep's failure is attributed to a limit outside fxsparse only on evidence: the same capture
with no fxsparse pass (plain ``torch.export.export`` of the model on the same inputs, in the
same mode) failing the same way, with the model's own line where it fails, or fxsparse's checks
blaming torch.export's own graph (``check_model`` compares it with eager). :func:`limit_of` reads
a record and says which limit, or that the failure is fxsparse's own.
"""

from __future__ import annotations

import os
import time
import traceback
from typing import Any

__all__ = ["json_child", "short_reason", "export_evidence", "limit_of", "stale", "listed", "commands", "load_records", "run_all", "limits_section", "FXSPARSE"]

FXSPARSE = "fxsparse (no limit outside it shown)"


def short_reason(e: BaseException) -> str:
    """``"Type: first line of the message"``, at most 300 characters: a sweep record's reason."""
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def json_child(command: list[str], name: str, timeout: float) -> dict[str, Any]:
    """Runs ``command`` (a sweep's child for the model ``name``, one thread) and returns the JSON
    record on the last line it prints starting with ``{``; a ``timeout`` or ``crashed`` record
    when it runs past ``timeout`` seconds or prints none."""
    import json
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"name": name, "status": "timeout", "reason": f"more than {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
        return {"name": name, "status": "crashed", "reason": f"exit {done.returncode}: {tail}"}
    result = json.loads(lines[-1])
    result.setdefault("seconds", round(time.perf_counter() - start, 1))
    return result


def _model_line(e: BaseException, packages: tuple[str, ...]) -> str | None:
    """The innermost frame of the model's own code (a path containing one of ``packages``) in
    ``e``'s traceback or message, as ``path:line``."""
    frames = [f"{f.filename}:{f.lineno}" for f in traceback.extract_tb(e.__traceback__)]
    frames += [line.strip().split('"')[1] + ":" + line.split("line ")[1].split(",")[0]
               for line in str(e).splitlines() if line.strip().startswith('File "') and "line " in line]
    ours = [f for f in frames if any(p in f for p in packages) and "/fxsparse/" not in f]
    if not ours:
        return None
    path, _, line = ours[-1].rpartition(":")
    for package in packages:
        if package in path:
            path = package + path.split(package, 1)[1]
    return f"{path}:{line}"


def export_evidence(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any], packages: tuple[str, ...],
                    reason: str = "") -> str:
    """Whether plain ``torch.export.export`` (no fxsparse pass) captures ``model`` on these inputs
    in the mode fxsparse's capture failed in (eval when ``reason`` says so, else train, which it
    captures first); where it fails, the error and the model's line (a frame in one of ``packages``)."""
    import copy

    import torch

    twin = copy.deepcopy(model).train("in eval mode" not in reason)
    try:
        torch.export.export(twin, tuple(args), dict(kwargs), strict=False)
    except Exception as e:  # noqa: BLE001 - the evidence is the error
        where = _model_line(e, packages)
        return f"plain torch.export fails too (no fxsparse pass): {short_reason(e)[:200]}" + (f" at {where}" if where else "")
    return "plain torch.export captures it"


def limit_of(stage: str | None, reason: str | None, evidence: str | None, status: str = "failed") -> str:
    """The limit a failed or timed-out record meets, named from its evidence, or :data:`FXSPARSE`."""
    reason = reason or ""
    if status == "timeout" and ("while building" in reason or "while eager" in reason):
        return "the model alone (building or running it dense) takes longer than the time limit: not fxsparse"
    if "torch.export's own graph" in reason and "differs from eager already" in reason:
        return "torch.export: its own graph of the model computes differently from eager (no fxsparse pass)"
    if "backward through torch.export's own graph fails already" in reason:
        return "torch.export: no backward through its own graph of the model (custom autograd or in-place)"
    if stage == "sparsify" and evidence and evidence.startswith("plain torch.export fails too"):
        if "GuardOnDataDependentSymNode" in evidence or "data-dependent" in evidence:
            return "torch.export: the model branches on a tensor's value (data-dependent control flow)"
        return "torch.export cannot capture the model (the same error without fxsparse)"
    return FXSPARSE


def stale(record: dict[str, Any], passing: tuple[str, ...] = ("pass", "ok")) -> bool:
    """A passing record made before some check of ``fxsparse.checks.CHECKS`` existed: run again
    so that "every check" means every check there is now."""
    from fxsparse.checks import CHECKS

    return record.get("status") in passing and bool(set(CHECKS) - set(record.get("passed") or {}))


def listed(record: dict[str, Any], width: int = 90) -> str:
    """What a record's model left dense, for a page's cell: how many parameters per reason (a
    reason cut at its first colon when long), or "none"."""
    import collections

    reasons = collections.Counter(
        (reason.split(":", 1)[0] if len(reason) > width else reason)[:width].replace("|", "/")
        for _, reason in record.get("skipped") or []
    )
    return "; ".join(f"{n} x {reason}" for reason, n in reasons.most_common()) or "none"


def commands(records: list[dict[str, Any]], default: str = "") -> list[str]:
    """A page's fenced block of the commands that made ``records`` (each once, in order)."""
    made = dict.fromkeys(f".venv/bin/python {r.get('command') or default}" for r in records if r.get("command") or default)
    return ["```", *made, "```"]


def load_records(path: Any, key: str, rerun: str = "", report_only: bool = False) -> dict[str, dict[str, Any]]:
    """The records of a sweep's JSON-lines file by ``key`` (a later record, a rerun's, replaces an
    earlier one), without those to run again: the statuses in ``rerun`` (comma-separated) and
    :func:`stale` passing records, unless only the page is written (``report_only``)."""
    import json
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    done: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                done[record[key]] = record
    if report_only:
        return done
    again = {status for status in rerun.split(",") if status}
    return {k: r for k, r in done.items() if r["status"] not in again and not stale(r)}


def run_all(todo: list[str], run: Any, workers: int, path: Any, command: str, done: dict[str, dict[str, Any]]) -> None:
    """Runs ``run(name)`` for every name of ``todo`` on ``workers`` threads, appending each
    record (with ``command``) to the JSON-lines file ``path`` as it comes and into ``done``."""
    import json
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool, open(path, "a") as sink:
        for i, result in enumerate(pool.map(run, todo)):
            result["command"] = command
            sink.write(json.dumps(result) + "\n")
            sink.flush()
            done[result["name"]] = result
            print(f"[{i + 1}/{len(todo)}] {result['name']}: {result['status']} {result.get('reason') or ''}"[:200], flush=True)


def limits_section(records: list[dict[str, Any]], key: str, failed: str) -> list[str]:
    """A page's section naming the limit each failing record meets (status ``failed``, timeout
    or crashed), with its evidence (:func:`limit_of`); the ones no limit outside fxsparse explains
    first. ``key``: the record's model name field."""
    import collections

    failing = [r for r in records if r["status"] in (failed, "timeout", "crashed")]
    if not failing:
        return []
    by_limit: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for r in failing:
        by_limit[limit_of(r.get("stage"), r.get("reason"), r.get("evidence"), r["status"])].append(r)
    lines = [
        "", "## The limit each failure meets", "",
        "A failure is put on a limit outside fxsparse only on evidence: plain `torch.export.export` of the model on "
        "the same inputs in the mode the capture failed in (no fxsparse pass) failing too, with the model's own "
        "line, or `check_model` finding torch.export's own graph differ from eager or lack a backward. The rest "
        "are fxsparse's to fix.", "",
    ]
    for limit in sorted(by_limit, key=lambda k: (k != FXSPARSE, -len(by_limit[k]))):
        rows = sorted(by_limit[limit], key=lambda r: r[key])
        lines += [f"### {limit} ({len(rows)})", ""]
        for r in rows:
            detail = (r.get("evidence") or r.get("reason") or "").replace("`", "'")
            lines.append(f"- {r[key]}: {detail if len(detail) <= 300 else detail[:297] + '...'}")
        lines.append("")
    return lines
