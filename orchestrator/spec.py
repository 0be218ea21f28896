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

from orchestrator.learner_kinds import MISSING, Field, LearnerKind, is_finite_number, learner_kind, unknown_kind_message
from orchestrator.runs import Run, TaskSpec
from orchestrator.task_kinds import TaskKind, task_kind, unknown_task_message

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
EVALUATION_SUFFIX = ".evaluation"  # `<name>.evaluation`: a sweep's evaluation-stage results folder (reserved)
MAX_STEPS = 2**31 - 1  # the learners' step counter `t` and the divergence guard's counter are int32
MAX_SEED = 2**32 - 1  # seeds become uint32 PRNG seeds on the device


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


def external_packages(sweep: Sweep) -> dict[str, Path]:
    """The top-level packages of the learners and tasks a sweep names by module path, and the folder
    this interpreter imports each from: what a cluster job must also upload as Ray py_modules so that
    every node can import them (docs/cluster.md). Built-in kinds are part of the project's packages."""
    import importlib.util

    import environments
    from learners import registry

    names = {run.learner for run in sweep.runs if run.learner not in registry.names()}
    names |= {task.kind for task in sweep.tasks if task.kind not in environments.available_tasks()}
    folders = {}
    for name in sorted(names):
        top = name.split(".")[0]
        found = importlib.util.find_spec(top)
        if found is None or not found.submodule_search_locations:
            raise ValueError(f"{name!r}: {top!r} is not an importable package (a folder with __init__.py): "
                             "put the module in a package so that it can be uploaded")
        folders[top] = Path(next(iter(found.submodule_search_locations))).resolve()
    return folders


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
        line = f"{self.path}: {key}: {message}"
        if line not in self.problems:
            self.problems.append(line)

    # -- scalars --------------------------------------------------------------------------
    def check_keys(self, table: dict, prefix: str, allowed) -> None:
        for key in table:
            if key not in allowed:
                self.problem(f"{prefix}{key}", "unknown key" + _suggest(key, allowed))

    def positive_int(
        self, table: dict, key: str, where: str, default: Any = MISSING, maximum: tuple[int, str] | None = None
    ) -> int | None:
        """A positive integer (at most maximum[0], whose reason is maximum[1]), or report and return None."""
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
        if maximum is not None and value > maximum[0]:
            self.problem(where, f"{value:,} is too large: at most {maximum[0]:,} ({maximum[1]})")
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
        elif field.type is bool and not isinstance(value, bool):
            self.problem(where, f"must be true or false, got {_type_name(value)} {value!r}")
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
        elif name.endswith(EVALUATION_SUFFIX):
            self.problem(
                "name",
                f"{name!r}: names ending in {EVALUATION_SUFFIX!r} are reserved for a sweep's evaluation-stage "
                f"results folder ({name[: -len(EVALUATION_SUFFIX)]!r} would write there): choose another name",
            )
        description = doc.get("description", "")
        if not isinstance(description, str):
            self.problem("description", f"must be a string, got {_type_name(description)}")
        steps = self.positive_int(doc, "steps", "steps", maximum=_STEPS_LIMIT)
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
        if seeds and evaluation_seeds and max(seeds) + evaluation_seeds > MAX_SEED:
            self.problem(
                "evaluation_seeds",
                f"the evaluation seeds follow the largest seed ({max(seeds):,}) and would pass {MAX_SEED:,} "
                "(seeds are uint32): use smaller seeds",
            )

        tasks = self.parse_tasks(doc.get("tasks", MISSING))
        entries = self.parse_learners(doc.get("learners", MISSING), tasks)
        if log_every:
            self.check_measures(tasks, log_every)
            for entry in entries:
                if entry["steps"] and entry["steps"] % log_every:
                    self.problem(entry["prefix"] + "steps", f"must be a multiple of log_every ({log_every})")
        if steps:
            self.check_recordings(max([steps, *(entry["steps"] or 0 for entry in entries)]))
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
            if seeds > MAX_SEED + 1:
                self.problem("seeds", f"a seed count must be at most {MAX_SEED + 1:,} (uint32 seeds), got {seeds:,}")
                return []
            return list(range(seeds))
        if not isinstance(seeds, list):
            self.problem("seeds", f"must be a list of integers or a count, got {_type_name(seeds)}")
            return []
        if not seeds:
            self.problem("seeds", "empty grid: give at least one seed")
            return []
        bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEED]
        if bad:
            self.problem("seeds", f"seeds must be integers from 0 to {MAX_SEED:,} (uint32), got {bad[0]!r}")
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

    def task_kind_of(self, table: dict, prefix: str) -> TaskKind | None:
        """The task kind a table names: a registered name or an importable module path (environments)."""
        kind = table.get("kind", MISSING)
        if kind is MISSING or not isinstance(kind, str):
            import environments

            got = "missing" if kind is MISSING else f"must be a string, got {_type_name(kind)} {kind!r}"
            self.problem(f"{prefix}kind", f"{got} (one of: {', '.join(environments.available_tasks())})")
            return None
        try:
            return task_kind(kind)
        except LookupError:
            self.problem(f"{prefix}kind", unknown_task_message(kind))
        except ValueError as error:
            self.problem(f"{prefix}kind", str(error))
        return None

    # -- tasks ----------------------------------------------------------------------------
    def parse_tasks(self, value: Any) -> list[TaskSpec]:
        tasks: list[TaskSpec] = []
        self.task_tables: dict[TaskSpec, str] = {}  # task -> its table ("tasks[2]")
        self.recordings: dict[TaskSpec, int] = {}  # Atari task without wrap -> its recording's frames
        for number, table in enumerate(self.tables(value, "tasks", "what the learners predict"), start=1):
            prefix = f"tasks[{number}]."
            kind = self.task_kind_of(table, prefix)
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
            task = self.make_task(kind, params, table, prefix)
            if task is None:
                continue
            same = next((t for t in tasks if (t.kind, t.identity) == (task.kind, task.identity)), None)
            if same is not None:
                names = f"named {same.name!r} and {task.name!r}" if same.name != task.name else f"both {task.name!r}"
                self.problem(
                    prefix.rstrip("."),
                    f"the same task as {self.task_tables[same]} ({names}: same kind and parameters), so the "
                    "same runs: remove one or change a parameter",
                )
                continue
            tasks.append(task)
            self.task_tables[task] = prefix.rstrip(".")
        seen: dict[str, TaskSpec] = {}
        for task in tasks:
            if task.name in seen:
                self.problem(
                    self.task_tables[task],
                    f"{self.task_tables[seen[task.name]]} is also named {task.name!r}: give them distinct names",
                )
            seen[task.name] = task
        return tasks

    def check_recordings(self, steps: int) -> None:
        """An Atari task without wrap must have a recording of at least the longest run's steps."""
        for task, frames in self.recordings.items():
            if frames < steps:
                self.problem(
                    self.task_tables[task] + ".frames",
                    f"the recording of task {task.name!r} holds {frames:,} frames, fewer than the {steps:,} steps "
                    "to run (wrap = false): set frames (at least the steps; a policy file must hold that many), "
                    "wrap = true, or fewer steps",
                )

    def check_measures(self, tasks: list[TaskSpec], log_every: int) -> None:
        """Each task's error measures must fit the log interval (e.g. window vs log_every)."""
        for task in tasks:
            try:
                task_kind(task.kind).reducer(task.params_dict.get("window"), log_every)
            except ValueError as error:
                self.problem(f"log_every (task {task.name!r})", str(error))

    def make_task(self, kind: TaskKind, params: dict, table: dict, prefix: str) -> TaskSpec | None:
        """The task of one [[tasks]] table: its parameters checked by its kind (environments.TaskKind)."""
        try:
            params, identity, n_inputs, frames = kind.check(params, self.path.parent)
        except (ValueError, TypeError, FileNotFoundError) as error:
            key = "policy_dir" if isinstance(error, FileNotFoundError) else ""
            self.problem(prefix + key if key else prefix.rstrip("."), str(error))
            return None
        name = table.get("name", kind.default_name(params))
        if not is_safe_path_component(name):
            self.problem(
                prefix + "name",
                f"{name!r} is not a safe folder name: set name = \"...\" with letters, digits, '.', '_' and '-'",
            )
            return None
        task = TaskSpec(
            name=name,
            kind=kind.name,
            n_inputs=n_inputs,
            params=tuple(sorted(params.items())),
            identity=tuple(sorted(identity.items())),
        )
        if frames is not None:
            self.recordings[task] = frames
        return task

    # -- learners -------------------------------------------------------------------------
    def learner_kind_of(self, table: dict, prefix: str) -> LearnerKind | None:
        """The learner kind a table names: a registered name or an importable module path."""
        kind = table.get("kind", MISSING)
        if kind is MISSING or not isinstance(kind, str):
            from learners import registry

            got = "missing" if kind is MISSING else f"must be a string, got {_type_name(kind)} {kind!r}"
            self.problem(f"{prefix}kind", f"{got} (one of: {', '.join(registry.names())}, or a module path)")
            return None
        try:
            return learner_kind(kind)
        except LookupError:
            self.problem(f"{prefix}kind", unknown_kind_message(kind))
        except ValueError as error:
            self.problem(f"{prefix}kind", str(error))
        return None

    def parse_learners(self, value: Any, tasks: list[TaskSpec] | None = None) -> list[dict]:
        """Check each [[learners]] table; return entries {kind, name, shapes | match, axes, prefix}."""
        entries = []
        n_inputs = tasks[0].n_inputs if tasks else 1  # for checking settings before expansion
        for number, table in enumerate(self.tables(value, "learners", "what to run"), start=1):
            prefix = f"learners[{number}]."
            kind = self.learner_kind_of(table, prefix)
            if kind is None:
                continue
            self.check_keys(table, prefix, LEARNER_KEYS + tuple(f.name for f in kind.fields))
            entry: dict[str, Any] = {"kind": kind, "prefix": prefix, "shapes": None, "match": None}
            name = table.get("name")
            if name is not None and not is_safe_path_component(name):
                self.problem(prefix + "name", f"{name!r} is not a safe name (letters, digits, '.', '_', '-')")
            entry["name"] = name
            entry["steps"] = self.positive_int(table, "steps", prefix + "steps", default=None, maximum=_STEPS_LIMIT)
            has_shape, has_match = "shape" in table, "match_flops" in table
            if has_shape and has_match:
                self.problem(prefix + "shape", "give either shape or match_flops, not both")
            elif has_match:
                entry["match"] = self.parse_match(table["match_flops"], prefix + "match_flops", kind)
            elif has_shape:
                entry["shapes"] = self.parse_shapes(kind, table["shape"], prefix + "shape", n_inputs)
            else:
                self.problem(
                    prefix + "shape",
                    f'missing (e.g. shape = {kind.shape_example!r}, or match_flops = {{ of = "<learner>", '
                    "tolerance = 0.15 }})",
                )
            entry["axes"] = {f.name: self.grid_axis(f, table, prefix + f.name) for f in kind.fields}
            self.check_static(entry, n_inputs)
            entries.append(entry)
        self.resolve_names(entries)
        return entries

    def check_static(self, entry: dict, n_inputs: int) -> None:
        """Each static setting's values, tried in the learner's Config (with its first shape): bad ones
        are reported at their key and leave the axis invalid."""
        kind: LearnerKind = entry["kind"]
        shape = entry["shapes"][0] if entry["shapes"] else None
        for field in kind.static_fields:
            values = entry["axes"].get(field.name)
            if not values or shape is None:
                continue
            for value in values:
                try:
                    kind.make_config({**shape, **kind.static_defaults, field.name: value}, n_inputs)
                except (TypeError, ValueError) as error:
                    self.problem(entry["prefix"] + field.name, f"{error}")
                    entry["axes"][field.name] = None
                    break

    def parse_shapes(self, kind: LearnerKind, value: Any, where: str, n_inputs: int = 1) -> list[dict] | None:
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
                shapes.append(kind.parse_shape(text, n_inputs))
            except (TypeError, ValueError) as error:
                self.problem(where, str(error))
                return None
        return shapes

    def parse_match(self, value: Any, where: str, kind: LearnerKind) -> dict | None:
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
        elif truncations is not None and "truncation" not in kind.shape_fields:
            self.problem(where + ".truncations", f"{kind.name} has no truncation in its shape ({kind.shape_example!r})")
            measure = None
        if not callable(getattr(kind.module, "candidate_shapes", None)):
            self.problem(
                where,
                f"{kind.name} gives no candidate_shapes(n_inputs) to search, so it cannot be matched to "
                f"another's compute: give shape = {kind.shape_example!r}",
            )
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
        """Default learner names (the learner's family, e.g. columnar / constructive / ccn) when the shape says it."""
        for entry in entries:
            if entry["name"] is None and entry["shapes"] and len(entry["shapes"]) == 1:
                entry["default_name"] = entry["kind"].family({**entry["kind"].static_defaults, **entry["shapes"][0]})
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
        """The shapes of entry's learner whose cost is within tolerance of the referenced learner's
        (any two kinds: each learner's own cost and candidate_shapes, learners.compute.matching_shapes)."""
        match = entry["match"]
        target = self.reference(entries, match)
        if target is None or target["shapes"] is None:
            return None
        if target["match"] is not None or len(target["shapes"]) != 1:
            self.problem(match["where"] + ".of", f"{match['of']!r} must have exactly one shape to set a budget")
            return None
        from learners import compute

        target_kind: LearnerKind = target["kind"]
        target_static = {f.name: (target["axes"].get(f.name) or [f.default])[0] for f in target_kind.static_fields}
        try:
            target_cost = target_kind.cost({**target_static, **target["shapes"][0]}, task.n_inputs)
        except (TypeError, ValueError) as error:
            self.problem(match["where"] + ".of", f"{match['of']!r} on task {task.name!r}: {error}")
            return None
        budget = compute.budget_of(target_cost, match["measure"])
        kind: LearnerKind = entry["kind"]
        static_axes = {f.name: entry["axes"].get(f.name) or [f.default] for f in kind.static_fields}
        shapes: dict[tuple, dict] = {}
        for values in itertools.product(*static_axes.values()):
            static = dict(zip(static_axes, values, strict=True))
            try:
                configs = compute.matching_shapes(
                    kind.module, budget, task.n_inputs, match["tolerance"], match["measure"], **static
                )
            except (TypeError, ValueError) as error:
                self.problem(match["where"], str(error))
                return None
            for cfg in configs:
                shape = {name: getattr(cfg, name) for name in kind.shape_fields}
                if match["truncations"] is None or shape.get("truncation") in match["truncations"]:
                    shapes.setdefault(tuple(shape.items()), shape)
        if not shapes:
            self.problem(
                match["where"],
                f"no {kind.title} shape costs within {match['tolerance']:.0%} of "
                f"{match['of']!r}'s {budget:,} {match['measure']} per step on task "
                f"{task.name!r}"
                + (" with those truncations" if match["truncations"] else "")
                + f": raise the tolerance or give shape = {kind.shape_example!r}",
            )
            return None
        return list(shapes.values())

    # -- expansion ------------------------------------------------------------------------
    def expand(self, entries, tasks, seeds, steps, log_every) -> list[Run]:
        runs: dict[str, Run] = {}
        owner: dict[str, dict] = {}  # run_key -> the learner entry that made it
        clashes: set[tuple[str, str]] = set()
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
                    for static_values in itertools.product(*static.values()):
                        config = {**shape, **dict(zip(static, static_values, strict=True))}
                        try:
                            config = kind.identity(kind.make_config(config, task.n_inputs))
                        except (TypeError, ValueError) as error:
                            self.problem(entry["prefix"] + "shape", f"on task {task.name!r}: {error}")
                            continue
                        name = entry["name"] or (
                            kind.family(config, task.n_inputs) if entry["match"] is None else kind.name
                        )
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
                                first = runs.setdefault(run.run_key, run)
                                owner.setdefault(run.run_key, entry)
                                if first.learner_name != name and (owner[run.run_key]["prefix"], entry["prefix"]) \
                                        not in clashes:
                                    clashes.add((owner[run.run_key]["prefix"], entry["prefix"]))
                                    self.problem(
                                        entry["prefix"].rstrip("."),
                                        f"repeats runs of {owner[run.run_key]['prefix'].rstrip('.')} under another "
                                        f"name ({name!r}, there {first.learner_name!r}; e.g. seed {seed} on task "
                                        f"{task.name!r}): a run is stored once, so one name would lose them; "
                                        "make the grids disjoint or drop one",
                                    )
        return list(runs.values())


_STEPS_LIMIT = (MAX_STEPS, "the learners' step counters are int32")


def _divisor_near(steps: int, wanted: int) -> int:
    divisors = [d for d in range(1, min(steps, 10**6) + 1) if steps % d == 0]
    return min(divisors, key=lambda d: abs(d - wanted))
