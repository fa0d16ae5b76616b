"""Validation results of separate jobs, yielded in step order (the reference release's ``MetricsQueue``).

Validation jobs append one JSON line per (step, validation set) to a JSONL file, in whatever order they finish:
``{"step": 2500, "group": "dev-clean", "loss": ...}``. A training process logs them to wandb, which wants
increasing steps: :class:`MetricsQueue` reads the lines added since it last looked and yields, for each group,
the results of the next expected step (``start``, ``start + interval``, ...) as soon as they are there, holding
back later steps until the missing one arrives. Lines must only ever be appended (or inserted): a line removed
or changed is a ValueError. ``python -m spidr.tools.metrics_queue FILE --entity E`` pushes what a finished run
did not log.
"""

from __future__ import annotations

import difflib
import json
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["MetricsQueue", "pull_inserted_lines", "push_later_to_wandb"]


def pull_inserted_lines(a: Sequence[str], b: Sequence[str]) -> Iterator[str]:
    """The lines of ``b`` that are not in ``a`` (``b`` is a later version of the file ``a``).

    Raises:
        ValueError: ``b`` does not hold every line of ``a`` in order (a line was removed or changed).
    """
    for tag, _, _, start, end in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        if tag != "insert":
            raise ValueError(f"lines were removed or modified ({tag}): only appended or inserted lines are expected")
        yield from b[start:end]


class MetricsQueue:
    """Yield the metrics of a JSONL file in increasing step order for each group.

    Args:
        path: the JSONL file (it need not exist yet).
        interval: the step interval between two validations of a group.
        start: the first step expected; lines already in the file move each group's next step past them.
    """

    def __init__(self, path: Path, interval: int, start: int) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be positive, got {interval}")
        self.path, self.interval = Path(path), interval
        self._next_step: defaultdict[str, int] = defaultdict(lambda: start)
        self._queues: dict[str, list[tuple[int, dict[str, Any]]]] = {}
        self._previous: list[str] = []
        if self.path.is_file():
            self.reset()

    def reset(self) -> None:
        """Take the lines now in the file as already logged: each group's next step follows its last one."""
        self._previous = self.path.read_text(encoding="utf-8").splitlines()
        for line in self._previous:
            step, group, _ = self._parse(line)
            self._next_step[group] = max(self._next_step[group], step + self.interval)

    def _parse(self, line: str) -> tuple[int, str, dict[str, Any]]:
        try:
            metric = json.loads(line)
            return int(metric.pop("step")), str(metric.pop("group")), metric
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"{self.path}: not a metrics line with 'step' and 'group': {line!r} ({error})") from None

    def pull(self) -> Iterator[str]:
        """The lines added to the file since the last pull."""
        if not self.path.is_file():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines()
        yield from pull_inserted_lines(self._previous, lines)
        self._previous = lines

    def populate_queues(self) -> None:
        """Queue the new lines by group."""
        for line in self.pull():
            step, group, metric = self._parse(line)
            self._queues.setdefault(group, []).append((step, metric))

    def __call__(self) -> Iterator[dict[str, Any]]:
        """Yield ``{"<group>/<name>": value, ..., "<group>/step": step}`` for every group's next steps present.

        Raises:
            ValueError: a group got a step below the next expected one (logged already, or off the interval).
        """
        self.populate_queues()
        for group, queue in self._queues.items():
            queue.sort(key=lambda item: item[0])
            taken = 0
            for step, metric in queue:
                expected = self._next_step[group]
                if step < expected:
                    raise ValueError(
                        f"{self.path}: group {group!r} got step {step}, below the next expected step {expected}: "
                        f"{metric}"
                    )
                if step != expected:
                    break
                self._next_step[group] += self.interval
                taken += 1
                yield {f"{group}/{name}": value for name, value in metric.items()} | {f"{group}/step": step}
            del queue[:taken]


def push_later_to_wandb(path: Path, runid: str | None, entity: str) -> None:
    """Log to wandb the metrics of ``path`` (a run directory's metrics JSONL) that a finished run did not log:
    those past the last step wandb has for each group. The run is named by ``config.json`` beside ``path``.

    Raises:
        ValueError: no finished run, or several candidates without ``runid``.
    """
    import wandb

    config = json.loads((Path(path).parent / "config.json").read_text(encoding="utf-8"))
    project, name = config["run"]["wandb_project"], config["run"]["wandb_name"]
    api = wandb.Api()
    if runid is None:
        candidates = [r for r in api.runs(f"{entity}/{project}") if r.name == name and r.state != "running"]
        if len(candidates) != 1:
            raise ValueError(
                f"found {len(candidates)} finished runs named {name!r} in {entity}/{project}: give --runid"
            )
        runid = candidates[0].id
    history = api.run(f"{entity}/{project}/{runid}").history()
    records = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    logged: dict[str, float] = {}
    for group in {record["group"] for record in records}:
        column = f"{group}/step"
        logged[group] = float(history[column].max()) if column in history else float("-inf")
    todo = sorted((r for r in records if r["step"] > logged[r["group"]]), key=lambda r: (r["step"], r["group"]))
    if not todo:
        return
    workdir = Path(config["run"]["workdir"]).resolve()
    wandb.init(id=runid, project=project, entity=entity, resume="must", dir=workdir)
    for record in todo:
        group = record.pop("group")
        wandb.log({f"{group}/{key}": value for key, value in record.items()})
    wandb.finish()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m spidr.tools.metrics_queue", description="Push the metrics a finished run did not log to wandb."
    )
    parser.add_argument("path", type=Path, help="the metrics JSONL of the run directory")
    parser.add_argument("--entity", required=True, help="wandb entity (account or team)")
    parser.add_argument("--runid", help="wandb run id (default: the finished run named as in config.json)")
    args = parser.parse_args()
    push_later_to_wandb(args.path, args.runid, args.entity)
