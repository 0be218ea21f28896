"""Sweep specs: a TOML file parsed, validated and expanded into Runs (docs/sweeps.md).

    sweep = load_spec("sweeps/demo.toml")      # raises SpecError listing every problem
    sweep.runs                                 # tuple[Run]: tasks x learners x grids x seeds

Validation happens before anything runs. Every problem is one line naming the file, the key
and what is wrong (`sweeps/x.toml: learners[2].step_sise: unknown key; did you mean 'step_size'?`);
all of them are collected and raised together as one `SpecError`. Tables of an array are
numbered from 1 (`learners[2]` is the second `[[learners]]` table).
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import re
import tomllib
from pathlib import Path
from typing import Any

from orchestrator.learner_kinds import LEARNER_KINDS, MISSING, Field, LearnerKind, is_finite_number
from orchestrator.runs import Run, TaskSpec
from orchestrator.task_kinds import TASK_KINDS, TaskKind, check_atari, observation_size

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
TOP_LEVEL_KEYS = (
    "name",
    "description",
    "steps",
    "seeds",
    "log_every",
    "batch_size",
    "max_attempts",
    "checkpoint_every",
    "evaluation_seeds",
    "tasks",
    "learners",
)
LEARNER_KEYS = ("kind", "name", "shape", "match_flops", "steps")
MATCH_FLOPS_KEYS = ("of", "tolerance", "measure", "truncations")
TASK_KEYS = ("kind", "name")
DEFAULT_MAX_ATTEMPTS = 3
CHECKPOINT_TARGET_STEPS = 1_000_000  # "auto": checkpoint about every million steps
DEFAULT_EVALUATION_SEEDS = 5  # fresh seeds per winner in `ccn run SPEC --stage evaluate`


class SpecError(ValueError):
    """A sweep spec with problems; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        count = f"{len(problems)} problem" + ("s" if len(problems) != 1 else "")
        super().__init__(f"invalid sweep spec ({count}):\n" + "\n".join(f"  {line}" for line in problems))


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A validated sweep: its settings and its expanded runs (unique by run_key, spec order)."""

    name: str
    path: Path
    steps: int
    seeds: tuple[int, ...]
    log_every: int
    batch_size: int | None  # None: chosen for the device
    max_attempts: int
    tasks: tuple[TaskSpec, ...]
    runs: tuple[Run, ...]
    description: str = ""
    evaluation_seeds: int = DEFAULT_EVALUATION_SEEDS
    checkpoint_every: int = 0  # steps between a batch's checkpoints (a multiple of log_every); 0: never

    @property
    def evaluation_seed_list(self) -> tuple[int, ...]:
        """The evaluation stage's seeds: `evaluation_seeds` fresh ones after the largest selection seed."""
        first = max(self.seeds) + 1
        return tuple(range(first, first + self.evaluation_seeds))


def is_safe_path_component(text: Any) -> bool:
    """A name that may become one folder or file name: letters, digits, '.', '_', '-'."""
    return isinstance(text, str) and bool(SAFE_NAME.match(text)) and text not in (".", "..")


def load_spec(path: str | Path) -> Sweep:
    """Parse, validate and expand a sweep spec; raises SpecError with every problem found."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise SpecError([f"{path}: cannot read the spec: {error.strerror or error}"]) from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise SpecError([f"{path}: not valid TOML: {error}"]) from None
    return parse_spec(document, path)


def parse_spec(document: dict[str, Any], path: Path) -> Sweep:
    """Validate and expand an already-parsed TOML document (`path` names it in messages)."""
    parser = _Parser(path)
    sweep = parser.parse(document)
    if parser.problems:
        raise SpecError(parser.problems)
    return sweep


# --------------------------------------------------------------------------- the parser
def _type_name(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def _suggest(key: str, choices) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.6)
    close = close or [choice for choice in sorted(choices) if key and choice.startswith(key)][:1]
    return f"; did you mean {close[0]!r}?" if close else f" (expected one of: {', '.join(sorted(choices))})"


class _Parser:
    def __init__(self, path: Path):
        self.path = path
        self.problems: list[str] = []

    def problem(self, key: str, message: str) -> None:
        self.problems.append(f"{self.path}: {key}: {message}")

    # -- scalars --------------------------------------------------------------------------
    def check_keys(self, table: dict, prefix: str, allowed) -> None:
        for key in table:
            if key not in allowed:
                self.problem(f"{prefix}{key}", "unknown key" + _suggest(key, allowed))

    def positive_int(self, table: dict, key: str, where: str, default: Any = MISSING) -> int | None:
        value = table.get(key, default)
        if value is MISSING:
            self.problem(where, "missing (a positive integer)")
            return None
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(where, f"must be a positive integer, got {_type_name(value)} {value!r}")
            return None
        if value < 1:
            self.problem(where, f"must be a positive integer, got {value}")
            return None
        return value

    def field_value(self, field: Field, value: Any, where: str) -> Any:
        """Coerce one value of a field to its type (ints to floats), or report and return MISSING."""
        if field.type is float:
            if not is_finite_number(value):
                self.problem(where, f"must be a finite number, got {_type_name(value)} {value!r}")
                return MISSING
            value = float(value)
        elif field.type is int:
            if isinstance(value, bool) or not isinstance(value, int):
                self.problem(where, f"must be an integer, got {_type_name(value)} {value!r}")
                return MISSING
        elif field.type is str and not isinstance(value, str):
            self.problem(where, f"must be a string, got {_type_name(value)} {value!r}")
            return MISSING
        if field.check is not None and (reason := field.check(value)) is not None:
            self.problem(where, f"{reason}, got {value!r}")
            return MISSING
        return value

    def grid_axis(self, field: Field, table: dict, where: str) -> list | None:
        """A field's values: a scalar is one value, a list is a grid axis; None if invalid."""
        raw = table.get(field.name, field.default)
        if raw is MISSING:
            self.problem(where, f"missing ({field.type.__name__}{'; ' + field.doc if field.doc else ''})")
            return None
        values = raw if isinstance(raw, list) else [raw]
        if not values:
            self.problem(where, "empty grid: give at least one value")
            return None
        checked = [self.field_value(field, value, where) for value in values]
        if any(value is MISSING for value in checked):
            return None
        if len(set(checked)) != len(checked):
            self.problem(where, f"repeated values in the grid {values!r}")
            return None
        return checked

    # -- the document ---------------------------------------------------------------------
    def parse(self, doc: dict[str, Any]) -> Sweep | None:
        self.check_keys(doc, "", TOP_LEVEL_KEYS)
        name = doc.get("name", MISSING)
        if name is MISSING:
            self.problem("name", "missing (the sweep's name, used as its results folder)")
        elif not is_safe_path_component(name):
            self.problem(
                "name",
                f"{name!r} is not a safe folder name: use letters, digits, '.', '_' and '-' "
                "(at most 100, starting with a letter or digit)",
            )
        description = doc.get("description", "")
        if not isinstance(description, str):
            self.problem("description", f"must be a string, got {_type_name(description)}")
        steps = self.positive_int(doc, "steps", "steps")
        log_every = self.positive_int(doc, "log_every", "log_every", default=steps if steps else None)
        if steps and log_every and steps % log_every:
            self.problem(
                "log_every",
                f"must divide steps ({steps}); {log_every} does not (e.g. {_divisor_near(steps, log_every)})",
            )
        seeds = self.parse_seeds(doc.get("seeds", MISSING))
        batch_size = doc.get("batch_size", "auto")
        if batch_size == "auto":
            batch_size = None
        else:
            batch_size = self.positive_int(doc, "batch_size", "batch_size")
            if batch_size is None and "batch_size" in doc:
                self.problems[-1] += ' (or "auto")'
        max_attempts = self.positive_int(doc, "max_attempts", "max_attempts", default=DEFAULT_MAX_ATTEMPTS)
        checkpoint_every = self.parse_checkpoint_every(doc.get("checkpoint_every", "auto"), steps, log_every)
        evaluation_seeds = self.positive_int(
            doc, "evaluation_seeds", "evaluation_seeds", default=DEFAULT_EVALUATION_SEEDS
        )

        tasks = self.parse_tasks(doc.get("tasks", MISSING))
        entries = self.parse_learners(doc.get("learners", MISSING))
        if log_every:
            self.check_measures(tasks, log_every)
            for entry in entries:
                if entry["steps"] and entry["steps"] % log_every:
                    self.problem(entry["prefix"] + "steps", f"must be a multiple of log_every ({log_every})")
        if self.problems or not tasks:
            return None
        runs = self.expand(entries, tasks, seeds, steps, log_every)
        if self.problems:
            return None
        return Sweep(
            name=name,
            path=self.path,
            steps=steps,
            seeds=tuple(seeds),
            log_every=log_every,
            batch_size=batch_size,
            max_attempts=max_attempts or DEFAULT_MAX_ATTEMPTS,
            tasks=tuple(tasks),
            runs=tuple(runs),
            description=description,
            evaluation_seeds=evaluation_seeds or DEFAULT_EVALUATION_SEEDS,
            checkpoint_every=checkpoint_every,
        )

    def parse_checkpoint_every(self, value: Any, steps: int | None, log_every: int | None) -> int:
        """Steps between checkpoints: "auto" (about every million steps, on a log point), 0 (never)
        or a positive multiple of log_every."""
        if not steps or not log_every:
            return 0
        if value == "auto":
            every = max(1, round(CHECKPOINT_TARGET_STEPS / log_every)) * log_every
            return every if every < steps else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            self.problem("checkpoint_every", f'must be "auto", 0 (never) or a positive number of steps, got {value!r}')
            return 0
        if value % log_every:
            self.problem("checkpoint_every", f"must be a multiple of log_every ({log_every}); {value} is not")
            return 0
        return value if value < steps else 0

    def parse_seeds(self, seeds: Any) -> list[int]:
        if seeds is MISSING:
            self.problem("seeds", "missing (a list of seeds such as [0, 1, 2], or a count such as 3)")
            return []
        if isinstance(seeds, int) and not isinstance(seeds, bool):
            if seeds < 1:
                self.problem("seeds", f"a seed count must be >= 1, got {seeds}")
                return []
            return list(range(seeds))
        if not isinstance(seeds, list):
            self.problem("seeds", f"must be a list of integers or a count, got {_type_name(seeds)}")
            return []
        if not seeds:
            self.problem("seeds", "empty grid: give at least one seed")
            return []
        bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int) or s < 0]
        if bad:
            self.problem("seeds", f"seeds must be non-negative integers, got {bad[0]!r}")
            return []
        if len(set(seeds)) != len(seeds):
            self.problem("seeds", f"repeated seeds in {seeds!r}")
            return []
        return list(seeds)

    def tables(self, value: Any, key: str, what: str) -> list[dict]:
        if value is MISSING:
            self.problem(key, f"missing: add at least one [[{key}]] table ({what})")
            return []
        if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
            self.problem(key, f"must be an array of tables ([[{key}]]), got {_type_name(value)}")
            return []
        if not value:
            self.problem(key, f"empty: add at least one [[{key}]] table ({what})")
        return value

    def kind_of(self, table: dict, prefix: str, registry: dict) -> Any:
        kind = table.get("kind", MISSING)
        if kind is MISSING:
            self.problem(f"{prefix}kind", f"missing (one of: {', '.join(registry)})")
            return None
        if not isinstance(kind, str) or kind not in registry:
            self.problem(f"{prefix}kind", f"unknown kind {kind!r}" + _suggest(str(kind), registry))
            return None
        return registry[kind]

    # -- tasks ----------------------------------------------------------------------------
    def parse_tasks(self, value: Any) -> list[TaskSpec]:
        tasks: list[TaskSpec] = []
        for number, table in enumerate(self.tables(value, "tasks", "what the learners predict"), start=1):
            prefix = f"tasks[{number}]."
            kind: TaskKind | None = self.kind_of(table, prefix, TASK_KINDS)
            if kind is None:
                continue
            params = {key: tuple(v) if isinstance(v, list) else v for key, v in table.items() if key not in TASK_KEYS}
            allowed = kind.allowed_params(params)
            if isinstance(allowed, str):
                self.problem(prefix + "variant", allowed)
                continue
            self.check_keys(table, prefix, TASK_KEYS + allowed)
            if any(key not in allowed for key in params):
                continue
            window = params.get("window")
            if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
                self.problem(prefix + "window", f"must be a positive number of steps, got {window!r}")
                continue
            task = self.make_task(kind, kind.resolved_params(params), table, prefix)
            if task is not None:
                tasks.append(task)
        seen: dict[str, TaskSpec] = {}
        for task in tasks:
            if task.name in seen and seen[task.name] != task:
                self.problem("tasks", f"two different tasks are named {task.name!r}: give them distinct names")
            seen[task.name] = task
        return list(dict.fromkeys(tasks))

    def check_measures(self, tasks: list[TaskSpec], log_every: int) -> None:
        """Each task's error measures must fit the log interval (e.g. window vs log_every)."""
        from environments import metrics

        for task in tasks:
            try:
                metrics.make_reducer(task.kind, window=task.params_dict.get("window"), log_every=log_every)
            except ValueError as error:
                self.problem(f"log_every (task {task.name!r})", str(error))

    def make_task(self, kind: TaskKind, params: dict, table: dict, prefix: str) -> TaskSpec | None:
        name = table.get("name", kind.default_name(params))
        if not is_safe_path_component(name):
            self.problem(
                prefix + "name",
                f"{name!r} is not a safe folder name: set name = \"...\" with letters, digits, '.', '_' and '-'",
            )
            return None
        identity = dict(params)
        try:
            if not kind.device:
                params, identity = check_atari(params, self.path.parent)
            n_inputs = observation_size(kind.name, params)
        except (ValueError, TypeError, FileNotFoundError) as error:
            key = "policy_dir" if isinstance(error, FileNotFoundError) else ""
            self.problem(prefix + key if key else prefix.rstrip("."), str(error))
            return None
        return TaskSpec(
            name=name,
            kind=kind.name,
            n_inputs=n_inputs,
            params=tuple(sorted(params.items())),
            identity=tuple(sorted(identity.items())),
        )

    # -- learners -------------------------------------------------------------------------
    def parse_learners(self, value: Any) -> list[dict]:
        """Check each [[learners]] table; return entries {kind, name, shapes | match, axes, prefix}."""
        entries = []
        for number, table in enumerate(self.tables(value, "learners", "what to run"), start=1):
            prefix = f"learners[{number}]."
            kind: LearnerKind | None = self.kind_of(table, prefix, LEARNER_KINDS)
            if kind is None:
                continue
            self.check_keys(table, prefix, LEARNER_KEYS + tuple(f.name for f in kind.fields))
            entry: dict[str, Any] = {"kind": kind, "prefix": prefix, "shapes": None, "match": None}
            name = table.get("name")
            if name is not None and not is_safe_path_component(name):
                self.problem(prefix + "name", f"{name!r} is not a safe name (letters, digits, '.', '_', '-')")
            entry["name"] = name
            entry["steps"] = self.positive_int(table, "steps", prefix + "steps", default=None)
            has_shape, has_match = "shape" in table, "match_flops" in table
            if has_match and kind.name != "tbptt":
                self.problem(prefix + "match_flops", "only a tbptt learner can be matched to another's compute")
            elif has_shape and has_match:
                self.problem(prefix + "shape", "give either shape or match_flops, not both")
            elif has_match:
                entry["match"] = self.parse_match(table["match_flops"], prefix + "match_flops")
            elif has_shape:
                entry["shapes"] = self.parse_shapes(kind, table["shape"], prefix + "shape")
            else:
                hint = ' or match_flops = { of = "ccn", tolerance = 0.15 }' if kind.name == "tbptt" else ""
                self.problem(prefix + "shape", f"missing (e.g. shape = {kind.shape_example!r}{hint})")
            entry["axes"] = {f.name: self.grid_axis(f, table, prefix + f.name) for f in kind.fields}
            entries.append(entry)
        self.resolve_names(entries)
        return entries

    def parse_shapes(self, kind: LearnerKind, value: Any, where: str) -> list[dict] | None:
        values = value if isinstance(value, list) else [value]
        if not values:
            self.problem(where, "empty grid: give at least one shape")
            return None
        shapes = []
        for text in values:
            if not isinstance(text, str):
                self.problem(where, f"must be a string such as {kind.shape_example!r}, got {_type_name(text)} {text!r}")
                return None
            try:
                shapes.append(kind.parse_shape(text))
            except ValueError as error:
                self.problem(where, str(error))
                return None
        return shapes

    def parse_match(self, value: Any, where: str) -> dict | None:
        if not isinstance(value, dict):
            self.problem(where, f'must be a table such as {{ of = "ccn", tolerance = 0.15 }}, got {_type_name(value)}')
            return None
        self.check_keys(value, where + ".", MATCH_FLOPS_KEYS)
        of = value.get("of", MISSING)
        if not isinstance(of, str):
            self.problem(where + ".of", "missing or not a string: the name or kind of the learner to match")
            of = None
        tolerance = value.get("tolerance", 0.15)
        if not is_finite_number(tolerance) or tolerance < 0:
            self.problem(where + ".tolerance", f"must be a number >= 0 (a fraction: 0.15 is 15%), got {tolerance!r}")
            tolerance = None
        measure = value.get("measure", "flops")
        if measure not in ("flops", "paper_ops"):
            self.problem(where + ".measure", f"must be 'flops' or 'paper_ops', got {measure!r}")
            measure = None
        truncations = value.get("truncations")
        if truncations is not None and (
            not isinstance(truncations, list)
            or not truncations
            or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in truncations)
        ):
            self.problem(where + ".truncations", f"must be a non-empty list of positive integers, got {truncations!r}")
            measure = None
        if None in (of, tolerance, measure):
            return None
        return {
            "of": of,
            "tolerance": float(tolerance),
            "measure": measure,
            "where": where,
            "truncations": None if truncations is None else set(truncations),
        }

    def resolve_names(self, entries: list[dict]) -> None:
        """Default learner names (columnar / constructive / ccn / tbptt) when the shape says it."""
        for entry in entries:
            if entry["name"] is None and entry["shapes"] and len(entry["shapes"]) == 1:
                entry["default_name"] = entry["kind"].family(entry["shapes"][0])
            else:
                entry["default_name"] = entry["name"] or entry["kind"].name

    def reference(self, entries: list[dict], match: dict) -> dict | None:
        """The learner entry a match_flops names: by name first, else by kind if unique."""
        of = match["of"]
        for candidates in (
            [e for e in entries if e["name"] == of],
            [e for e in entries if e["name"] is None and e["default_name"] == of],
            [e for e in entries if e["kind"].name == of and e["match"] is None],
        ):
            if len(candidates) == 1:
                return candidates[0]
            if len(candidates) > 1:
                self.problem(
                    match["where"] + ".of",
                    f"{of!r} names {len(candidates)} learners: give them distinct "
                    'names (name = "...") and refer to one',
                )
                return None
        known = sorted({e["name"] or e["default_name"] for e in entries if e["match"] is None})
        self.problem(match["where"] + ".of", f"no learner is named {of!r}" + _suggest(of, known))
        return None

    def matched_shapes(self, entry: dict, entries: list[dict], task: TaskSpec) -> list[dict] | None:
        match = entry["match"]
        target = self.reference(entries, match)
        if target is None or target["shapes"] is None:
            return None
        if target["match"] is not None or len(target["shapes"]) != 1:
            self.problem(match["where"] + ".of", f"{match['of']!r} must have exactly one shape to set a budget")
            return None
        from learners import compute

        target_kind: LearnerKind = target["kind"]
        target_config = {**target["shapes"][0], "dtype": "float32"}
        budget = compute.budget_of(target_kind.cost(target_config, task.n_inputs), match["measure"])
        variants = entry["axes"].get("variant") or ["recompute"]
        shapes: dict[tuple, None] = {}
        for variant in variants:
            for truncation, hidden in compute.matching_tbptt_shapes(
                budget, task.n_inputs, match["tolerance"], match["measure"], variant=variant
            ):
                if match["truncations"] is None or truncation in match["truncations"]:
                    shapes[(truncation, hidden)] = None
        if not shapes:
            self.problem(
                match["where"],
                f"no T-BPTT shape costs within {match['tolerance']:.0%} of "
                f"{match['of']!r}'s {budget:,} {match['measure']} per step on task "
                f"{task.name!r}"
                + (" with those truncations" if match["truncations"] else "")
                + ': raise the tolerance or give shape = "k:H"',
            )
            return None
        return [{"truncation": t, "hidden": h} for t, h in shapes]

    # -- expansion ------------------------------------------------------------------------
    def expand(self, entries, tasks, seeds, steps, log_every) -> list[Run]:
        runs: dict[str, Run] = {}
        for task in tasks:
            for entry in entries:
                kind: LearnerKind = entry["kind"]
                if any(values is None for values in entry["axes"].values()):
                    continue
                shapes = entry["shapes"] if entry["match"] is None else self.matched_shapes(entry, entries, task)
                if shapes is None:
                    continue
                static = {f.name: entry["axes"][f.name] for f in kind.static_fields}
                hyper = {f.name: entry["axes"][f.name] for f in kind.hyper_fields}
                for shape in shapes:
                    name = entry["name"] or (kind.family(shape) if entry["match"] is None else kind.name)
                    for static_values in itertools.product(*static.values()):
                        config = {**shape, **dict(zip(static, static_values, strict=True))}
                        for hyper_values in itertools.product(*hyper.values()):
                            for seed in seeds:
                                run = Run(
                                    learner=kind.name,
                                    learner_name=name,
                                    config=tuple(sorted(config.items())),
                                    hyper=tuple(sorted(zip(hyper, hyper_values, strict=True))),
                                    task=task,
                                    seed=seed,
                                    steps=entry["steps"] or steps,
                                    log_every=log_every,
                                )
                                runs.setdefault(run.run_key, run)
        return list(runs.values())


def _divisor_near(steps: int, wanted: int) -> int:
    divisors = [d for d in range(1, min(steps, 10**6) + 1) if steps % d == 0]
    return min(divisors, key=lambda d: abs(d - wanted))
