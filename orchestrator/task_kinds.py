"""The task kinds a sweep can name, and how the orchestrator builds each one's stream.

The orchestrator's adapter over `environments/`. Per kind it knows which parameters a spec may
set (the environment's own builder signature is the truth: `environments.animal` for the
animal-learning tasks, `environments.atari.make_atari_stream` for Atari), the observation size
(for compute matching before anything runs), the error measures logged for it, and which
parameters name the task in result paths.

Task parameters are passed to the environment as written (a TOML list becomes a tuple, e.g.
`iti_range = [80, 120]`); they are not grid axes: write one [[tasks]] table per setting.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
from pathlib import Path
from typing import Any

ORCHESTRATOR_PARAMS = ("window",)  # task parameters the orchestrator consumes (not the environment)


@dataclasses.dataclass(frozen=True)
class TaskKind:
    """How the orchestrator handles one task kind.

    device: generated on the device inside the scan (animal learning), else replayed from a
    recording (Atari). metrics: the error measures logged every `log_every` steps;
    primary_metric ranks runs in comparisons. named_by: parameters that join the task's
    default name (trace_patterning + variant "paper" -> "trace_patterning-paper").
    """

    name: str
    device: bool
    metrics: tuple[str, ...]
    primary_metric: str
    named_by: tuple[str, ...]

    def default_name(self, params: dict[str, Any]) -> str:
        return "-".join([self.name, *(str(params[key]) for key in self.named_by if key in params)])

    def resolved_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """params with the environment's defaults filled in (so that writing a default or leaving
        it out names the same task and the same run keys)."""
        if not self.device:
            return {"policy": "file", **params}
        from environments import animal

        variant = params.get("variant", animal.DEFAULT_VARIANT[self.name])
        builder = animal.ANIMAL_BUILDERS[(self.name, variant)]
        defaults = {
            name: parameter.default
            for name, parameter in inspect.signature(builder).parameters.items()
            if parameter.default is not inspect.Parameter.empty and parameter.default is not None
        }
        return {"variant": variant, **defaults, **params}

    def allowed_params(self, params: dict[str, Any]) -> tuple[str, ...] | str:
        """The parameter names a spec may set (given its variant), or a problem text."""
        if self.device:
            from environments import animal

            variant = params.get("variant", animal.DEFAULT_VARIANT[self.name])
            builder = animal.ANIMAL_BUILDERS.get((self.name, variant))
            if builder is None:
                variants = sorted(v for t, v in animal.ANIMAL_BUILDERS if t == self.name)
                return f"unknown variant {variant!r} of {self.name} (allowed: {', '.join(variants)})"
            return ("variant", *ORCHESTRATOR_PARAMS, *inspect.signature(builder).parameters)
        return ("game", "policy", "policy_dir", "policy_seed", "frames", "wrap", *ORCHESTRATOR_PARAMS)


ANIMAL_METRICS = ("msre_window", "msre_interval")
ATARI_METRICS = ("msre_window", "msre_interval", "msre_episode")

TASK_KINDS: dict[str, TaskKind] = {
    kind.name: kind
    for kind in (
        TaskKind("trace_patterning", True, ANIMAL_METRICS, "msre_window", named_by=("variant",)),
        TaskKind("trace_conditioning", True, ANIMAL_METRICS, "msre_window", named_by=("variant",)),
        TaskKind("noisy_patterning", True, ANIMAL_METRICS, "msre_window", named_by=("variant",)),
        TaskKind("atari", False, ATARI_METRICS, "msre_window", named_by=("game", "policy")),
    )
}


def environment_params(params: dict[str, Any]) -> dict[str, Any]:
    """The parameters handed to the environment's builder (orchestrator-only ones removed)."""
    return {key: value for key, value in params.items() if key not in ORCHESTRATOR_PARAMS}


def build_device_stream(kind: str, params: dict[str, Any]):
    """The environment's DeviceStream for an animal-learning task (ValueError names bad params)."""
    from environments import animal

    return animal.make_animal_stream(kind, **environment_params(params))


def check_atari(params: dict[str, Any], spec_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Validate an Atari task without running the emulator; returns (params, identity).

    Raises ValueError / FileNotFoundError with a message for people (unknown game, missing
    policy file). policy_dir is resolved against the spec's folder; identity holds the policy
    file's sha256 instead of its path, so run keys do not depend on where the file lives.
    """
    from environments import atari

    params = dict(params)
    if "game" not in params:
        raise ValueError("missing parameter 'game' (an ALE game such as 'Pong')")
    game = atari.resolve_game(str(params["game"]))
    policy = params.setdefault("policy", atari.FILE_POLICY)
    if policy != atari.FILE_POLICY and policy not in atari.BUILTIN_POLICIES:
        raise ValueError(
            f"unknown policy {policy!r}: use {atari.FILE_POLICY!r} (a policy file) or one of "
            f"{', '.join(map(repr, atari.BUILTIN_POLICIES))}"
        )
    identity = {key: value for key, value in params.items() if key != "policy_dir"}
    if policy == atari.FILE_POLICY:
        if params.get("policy_dir"):
            folder = Path(params["policy_dir"]).expanduser()
            params["policy_dir"] = str(folder if folder.is_absolute() else (spec_dir / folder).resolve())
        path = atari.find_policy_file(game, params.get("policy_dir"))
        identity["policy_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return params, identity


def build_atari_stream(params: dict[str, Any]):
    """The recorded stream of an Atari task (records it on first use; cached on disk)."""
    from environments import atari

    return atari.make_atari_stream(
        params["game"],
        params.get("policy", atari.FILE_POLICY),
        params.get("policy_dir"),
        seed=int(params.get("policy_seed", 0)),
        frames=params.get("frames"),
        wrap=bool(params.get("wrap", False)),
        progress=False,
    )


def observation_size(kind: str, params: dict[str, Any]) -> int:
    """d, the observation size of a task (the learners' n_inputs)."""
    if TASK_KINDS[kind].device:
        return int(build_device_stream(kind, params).observation_size)
    from environments.recording import OBSERVATION_SIZE

    return OBSERVATION_SIZE
