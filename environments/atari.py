"""Atari prediction streams on ale-py: replay a behaviour policy through the emulator, record once.

The stream (docs/environments.md, "Atari prediction"): at every emulator frame t the learner sees

    observation [275] float32 = [16 x 16 grayscale screen / 256 (256), one-hot action (18), reward (1)]
    cumulant  = the step's reward clipped to [-1, 1]
    gamma     = 0.98; 0 on a reset step and on the stream's first step
    true_return G_t = sum_{i>=1} (prod_{j=1}^{i-1} gamma_{t+j}) cumulant_{t+i}   (future cumulants only)

Recording runs the emulator (the slow part, ~10^4 frames/s) once per (game, policy, frames, ...)
and caches the result (environments/recording.py); every learner replays the cached file.

CLI:  python -m environments.atari record --game Pong [--policy-dir DIR] [--frames N]
      python -m environments.atari fidelity [--policy-dir DIR]
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from environments.recording import (
    ACTION_SLOTS,
    FRAME_SIDE,
    FRAME_SIZE,
    RESET_ACTION,
    RecordedStream,
    Recording,
    cache_key,
    default_cache_dir,
    future_returns,
    load_recording,
    write_recording,
)

AUTHORS_ALE_SEED = 1731038949  # the authors' ALE random_seed (what ale-py derives from seed 1)
ATARI_GAMMA = 0.98
POLICY_DIR_ENV = "CCN_ATARI_POLICY_DIR"
FILE_POLICY = "file"
BUILTIN_POLICIES = ("random", "sticky_random")
STICKY_REPEAT_PROBABILITY = 0.25  # sticky_random repeats its previous action with this probability
BUILTIN_DEFAULT_FRAMES = 250_000  # built-in policies' length when the caller gives none
MAX_EPISODE_FRAMES = 108_000  # built-in policies reset a game that lasts this long (ALE's usual cap)
_RANDOM_BLOCK = 4096  # built-in policies draw their random numbers in blocks of this many frames

# How many times this process ran the emulator, per ROM id (a cache hit leaves it unchanged).
EMULATOR_RUNS: Counter[str] = Counter()

_REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
_GAME_SUFFIX = re.compile(r"(NoFrameskip|Deterministic)?-v\d+$")


# --------------------------------------------------------------------------- games


@dataclass(frozen=True)
class AtariGame:
    """A game as ale-py knows it: name 'MontezumaRevenge', rom_id 'montezuma_revenge'."""

    name: str
    rom_id: str

    @property
    def policy_file_name(self) -> str:
        return f"{self.name}NoFrameskip-v4.txt"


def _rom_ids() -> list[str]:
    import ale_py.roms

    return list(ale_py.roms.get_all_rom_ids())


def resolve_game(game: str) -> AtariGame:
    """'Pong', 'PongNoFrameskip-v4', 'ALE/Pong-v5' or 'pong' -> AtariGame('Pong', 'pong')."""
    bare = _GAME_SUFFIX.sub("", game.strip().removeprefix("ALE/"))
    wanted = bare.replace("_", "").replace("-", "").lower()
    by_key = {rom_id.replace("_", ""): rom_id for rom_id in _rom_ids()}
    rom_id = by_key.get(wanted)
    if rom_id is None:
        names = sorted("".join(part.capitalize() for part in rom.split("_")) for rom in by_key.values())
        close = difflib.get_close_matches(bare, names, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else f" Known games: {', '.join(names)}."
        raise ValueError(f"Unknown Atari game {game!r}.{hint}")
    return AtariGame(name="".join(part.capitalize() for part in rom_id.split("_")), rom_id=rom_id)


# --------------------------------------------------------------------------- policy files


class PolicyNotFoundError(FileNotFoundError):
    """No behaviour-policy file for a game in any searched directory."""

    def __init__(self, game: AtariGame, searched: list[tuple[Path, str]]) -> None:
        self.game = game
        self.searched = searched
        places = "; ".join(f"{directory} ({origin})" for directory, origin in searched)
        super().__init__(
            f"No behaviour-policy file {game.policy_file_name} for Atari game {game.name!r}. "
            f"Searched: {places}. Point {POLICY_DIR_ENV} or policy_dir / --policy-dir at the folder "
            f"holding the policy files, or use a built-in policy ({', '.join(BUILTIN_POLICIES)})."
        )


def policy_search_dirs(policy_dir: str | os.PathLike | None = None) -> list[tuple[Path, str]]:
    """Directories searched for policy files, in order, each with where it came from.

    The first configured source is the only one searched:
      1. `policy_dir`, when given;
      2. else every entry of $CCN_ATARI_POLICY_DIR (os.pathsep-separated), when set;
      3. else the development defaults: shared/data/atari_policies beside and inside the
         repository root, then beside and inside the current directory.
    """
    if policy_dir is not None:
        return [(Path(policy_dir).expanduser(), "policy_dir argument")]
    from_environment = os.environ.get(POLICY_DIR_ENV, "")
    if from_environment.strip():
        entries = [entry for entry in from_environment.split(os.pathsep) if entry.strip()]
        return [(Path(entry).expanduser(), f"${POLICY_DIR_ENV}") for entry in entries]
    candidates = [
        (_REPOSITORY_ROOT.parent / "shared" / "data" / "atari_policies", "beside the repository"),
        (_REPOSITORY_ROOT / "shared" / "data" / "atari_policies", "inside the repository"),
        (Path.cwd().parent / "shared" / "data" / "atari_policies", "beside the current directory"),
        (Path.cwd() / "shared" / "data" / "atari_policies", "inside the current directory"),
    ]
    unique: dict[Path, str] = {}
    for directory, origin in candidates:
        unique.setdefault(directory.resolve(), origin)
    return list(unique.items())


def find_policy_file(game: str | AtariGame, policy_dir: str | os.PathLike | None = None) -> Path:
    """The policy file of `game` (`<Game>NoFrameskip-v4.txt`); PolicyNotFoundError if none."""
    game = game if isinstance(game, AtariGame) else resolve_game(game)
    searched = policy_search_dirs(policy_dir)
    for directory, _origin in searched:
        candidate = directory / game.policy_file_name
        if candidate.is_file():
            return candidate
    raise PolicyNotFoundError(game, searched)


def read_policy_file(path: Path, action_count: int) -> tuple[np.ndarray, str]:
    """Policy file -> (codes int8 [len - 1], sha256 of the file's bytes).

    The first character is skipped (as the authors' replay does); code i >= 0 means minimal
    action i, RESET_ACTION means reset the game on that frame.
    """
    content = path.read_bytes()
    digest = hashlib.sha256(content).hexdigest()
    characters = np.frombuffer(content.rstrip(b"\r\n"), dtype=np.uint8)
    codes = characters.astype(np.int16) - ord("a")
    codes[characters == ord("R")] = RESET_ACTION
    invalid = np.flatnonzero((codes >= action_count) | (codes < RESET_ACTION)
                             | ((codes == RESET_ACTION) & (characters != ord("R"))))
    if len(invalid):
        position = int(invalid[0])
        raise ValueError(
            f"{path}: character {chr(characters[position])!r} at position {position} is not 'R' or one "
            f"of the game's {action_count} minimal actions 'a'..{chr(ord('a') + action_count - 1)!r}"
        )
    return codes[1:].astype(np.int8), digest


# --------------------------------------------------------------------------- behaviour policies


class _FilePolicy:
    """Replays a policy file's codes, whatever the emulator says."""

    needs_game_over = False

    def __init__(self, codes: np.ndarray) -> None:
        self.codes = codes.tolist()

    def next_code(self, t: int, game_over: bool) -> int:
        return self.codes[t]


class _RandomPolicy:
    """Uniform random minimal actions (optionally sticky); resets when the game is over.

    Random numbers are drawn in fixed blocks, so a shorter stream is a prefix of a longer one.
    """

    needs_game_over = True

    def __init__(self, action_count: int, seed: int, repeat_probability: float) -> None:
        self.action_count = action_count
        self.repeat_probability = repeat_probability
        self.rng = np.random.default_rng(seed)
        self.previous = RESET_ACTION
        self.episode_frames = 0
        self.block_start = -_RANDOM_BLOCK
        self.fresh_actions: list[int] = []
        self.repeat: list[bool] = []

    def next_code(self, t: int, game_over: bool) -> int:
        if t >= self.block_start + _RANDOM_BLOCK:
            self.block_start = t
            self.fresh_actions = self.rng.integers(0, self.action_count, _RANDOM_BLOCK).tolist()
            self.repeat = (self.rng.random(_RANDOM_BLOCK) < self.repeat_probability).tolist()
        if game_over or self.episode_frames >= MAX_EPISODE_FRAMES:
            self.previous = RESET_ACTION
            self.episode_frames = 0
            return RESET_ACTION
        offset = t - self.block_start
        if not (self.repeat[offset] and self.previous != RESET_ACTION):
            self.previous = self.fresh_actions[offset]
        self.episode_frames += 1
        return self.previous


# --------------------------------------------------------------------------- the emulator


def _make_emulator(rom_id: str, ale_seed: int) -> Any:
    import ale_py

    ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)
    emulator = ale_py.ALEInterface()
    emulator.setInt("random_seed", ale_seed)
    emulator.setFloat("repeat_action_probability", 0.0)
    emulator.setInt("frame_skip", 1)
    emulator.loadROM(str(ale_py.roms.get_rom_path(rom_id)))
    emulator.reset_game()  # as the authors' replay does after loading the ROM
    return emulator


def downsample_screen(screen: np.ndarray) -> np.ndarray:
    """Grayscale screen uint8 [210, 160] -> uint8 [256]: cv2.resize to 16 x 16, INTER_LINEAR."""
    import cv2

    return cv2.resize(screen, (FRAME_SIDE, FRAME_SIDE), interpolation=cv2.INTER_LINEAR).reshape(FRAME_SIZE)


def emulate(
    game: str | AtariGame,
    policy: str = FILE_POLICY,
    *,
    policy_dir: str | os.PathLike | None = None,
    seed: int = 0,
    frames: int | None = None,
    ale_seed: int = AUTHORS_ALE_SEED,
    progress: bool = True,
) -> Recording:
    """Run the emulator under a behaviour policy and return the stream (no cache involved).

    frames: stream steps to produce (default: the whole policy file after its skipped first
    character, or BUILTIN_DEFAULT_FRAMES for a built-in policy).
    """
    import ale_py
    import cv2
    from tqdm import tqdm

    game = game if isinstance(game, AtariGame) else resolve_game(game)
    if policy != FILE_POLICY and policy not in BUILTIN_POLICIES:
        raise ValueError(f"Unknown Atari policy {policy!r}: use {FILE_POLICY!r} (a policy file) or one "
                         f"of {', '.join(map(repr, BUILTIN_POLICIES))}")
    if frames is not None and frames <= 0:
        raise ValueError(f"frames must be positive, got {frames}")
    policy_path = find_policy_file(game, policy_dir) if policy == FILE_POLICY else None

    emulator = _make_emulator(game.rom_id, ale_seed)
    minimal_actions = list(emulator.getMinimalActionSet())
    if len(minimal_actions) > ACTION_SLOTS:
        raise ValueError(f"{game.name} has {len(minimal_actions)} minimal actions, more than {ACTION_SLOTS}")
    metadata: dict[str, Any] = {"game": game.name, "rom_id": game.rom_id, "policy": policy}
    if policy_path is not None:
        codes, digest = read_policy_file(policy_path, len(minimal_actions))
        if frames is not None and frames > len(codes):
            raise ValueError(f"{policy_path} holds {len(codes):,} steps (after its skipped first "
                             f"character); {frames:,} frames were asked for")
        frames = len(codes) if frames is None else frames
        behaviour: _FilePolicy | _RandomPolicy = _FilePolicy(codes)
        metadata.update(policy_file=policy_path.name, policy_sha256=digest, seed=None)
    else:
        frames = BUILTIN_DEFAULT_FRAMES if frames is None else frames
        repeat_probability = STICKY_REPEAT_PROBABILITY if policy == "sticky_random" else 0.0
        behaviour = _RandomPolicy(len(minimal_actions), seed, repeat_probability)
        metadata.update(policy_sha256=None, seed=seed, repeat_probability=repeat_probability,
                        max_episode_frames=MAX_EPISODE_FRAMES)

    EMULATOR_RUNS[game.rom_id] += 1
    frame_rows = np.empty((frames, FRAME_SIZE), dtype=np.uint8)
    action = np.empty(frames, dtype=np.int8)
    raw_reward = np.zeros(frames, dtype=np.int32)
    height, width = emulator.getScreenDims()
    screen = np.empty((height, width), dtype=np.uint8)
    needs_game_over = behaviour.needs_game_over
    # The loop runs ~10^4 times a second: bind the calls once, and resize straight into the output.
    act, reset_game, game_over = emulator.act, emulator.reset_game, emulator.game_over
    grayscale_into, resize, linear = emulator.getScreenGrayscale, cv2.resize, cv2.INTER_LINEAR
    next_code, frame_size = behaviour.next_code, (FRAME_SIDE, FRAME_SIDE)
    frame_grids = frame_rows.reshape(frames, FRAME_SIDE, FRAME_SIDE)  # a view: [T, 16, 16]
    started = time.perf_counter()
    progress_every = 2048
    with tqdm(total=frames, unit="frame", unit_scale=True, desc=f"recording {game.name}",
              disable=not progress, mininterval=0.5, smoothing=0.1) as bar:
        for t in range(frames):
            code = next_code(t, needs_game_over and game_over())
            if code == RESET_ACTION:
                reset_game()
            else:
                raw_reward[t] = act(minimal_actions[code])
            action[t] = code
            grayscale_into(screen)
            resize(screen, frame_size, dst=frame_grids[t], interpolation=linear)
            if t % progress_every == progress_every - 1:
                bar.update(progress_every)
        bar.update(frames - bar.n)
    seconds = time.perf_counter() - started

    cumulant = np.clip(raw_reward, -1, 1).astype(np.float32)
    gamma = np.where(action == RESET_ACTION, 0.0, ATARI_GAMMA).astype(np.float32)
    gamma[0] = 0.0  # the stream's first step opens an episode (its reset was the skipped character)
    recording = Recording(frames=frame_rows, action=action, raw_reward=raw_reward, cumulant=cumulant,
                          gamma=gamma, true_return=future_returns(cumulant, gamma), metadata=metadata)
    scores = recording.episode_scores()
    metadata.update(
        ale_py_version=ale_py.__version__, opencv_version=cv2.__version__, ale_seed=ale_seed,
        frames=frames, gamma=ATARI_GAMMA, minimal_action_count=len(minimal_actions),
        resize="cv2.resize INTER_LINEAR 210x160 -> 16x16", episodes_finished=len(scores),
        episode_scores=scores, recording_seconds=round(seconds, 3),
        created_utc=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    return recording


# --------------------------------------------------------------------------- record once


def recording_key_inputs(
    game: AtariGame, policy: str, *, policy_dir: str | os.PathLike | None, seed: int,
    frames: int | None, ale_seed: int,
) -> dict[str, Any]:
    """Everything that determines a recording's content (hashed into its cache file name)."""
    import ale_py

    inputs: dict[str, Any] = {"rom_id": game.rom_id, "policy": policy, "ale_py_version": ale_py.__version__,
                              "ale_seed": ale_seed, "frames": frames, "gamma": ATARI_GAMMA}
    if policy == FILE_POLICY:
        content = find_policy_file(game, policy_dir).read_bytes()
        inputs["policy_sha256"] = hashlib.sha256(content).hexdigest()
        if frames is None:  # the whole file after its skipped first character
            inputs["frames"] = len(content.rstrip(b"\r\n")) - 1
    else:
        inputs["frames"] = BUILTIN_DEFAULT_FRAMES if frames is None else frames
        inputs.update(seed=seed, repeat_probability=STICKY_REPEAT_PROBABILITY if policy == "sticky_random"
                      else 0.0, max_episode_frames=MAX_EPISODE_FRAMES)
    return inputs


def record(
    game: str,
    policy: str = FILE_POLICY,
    *,
    policy_dir: str | os.PathLike | None = None,
    seed: int = 0,
    frames: int | None = None,
    ale_seed: int = AUTHORS_ALE_SEED,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    force: bool = False,
) -> Path:
    """Record a game's stream into the cache (unless already there) and return the file's path.

    The file name holds a sha256 over game, policy (its file's sha256, or seed), frames, ale-py
    version and ALE seed, so a second request for the same inputs runs no emulator.
    `seed` only matters to the built-in policies; a policy file's stream ignores it.
    """
    atari_game = resolve_game(game)
    if policy != FILE_POLICY and policy not in BUILTIN_POLICIES:
        raise ValueError(f"Unknown Atari policy {policy!r}: use {FILE_POLICY!r} (a policy file) or one "
                         f"of {', '.join(map(repr, BUILTIN_POLICIES))}")
    inputs = recording_key_inputs(atari_game, policy, policy_dir=policy_dir, seed=seed, frames=frames,
                                  ale_seed=ale_seed)
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = directory / f"{atari_game.name}-{policy}-{inputs['frames']}-{cache_key(inputs)[:20]}.parquet"
    if path.is_file() and not force:
        return path
    recording = emulate(atari_game, policy, policy_dir=policy_dir, seed=seed, frames=frames,
                        ale_seed=ale_seed, progress=progress)
    recording.metadata["cache_key_inputs"] = inputs
    return write_recording(path, recording)


def make_atari_stream(
    game: str,
    policy: str = FILE_POLICY,
    policy_dir: str | os.PathLike | None = None,
    seed: int = 0,
    frames: int | None = None,
    *,
    ale_seed: int = AUTHORS_ALE_SEED,
    cache_dir: str | os.PathLike | None = None,
    wrap: bool = False,
    progress: bool = True,
) -> RecordedStream:
    """A host stream of an Atari game: `take(n)` -> StreamStep (observation [n, 275] float32, ...).

    policy: 'file' (the game's policy file, looked up as `policy_search_dirs` says), 'random' or
    'sticky_random' (seeded by `seed`). Records on first use (cached on disk), then every stream
    of the same recording in this process shares one loaded copy.
    """
    path = record(game, policy, policy_dir=policy_dir, seed=seed, frames=frames, ale_seed=ale_seed,
                  cache_dir=cache_dir, progress=progress)
    return RecordedStream(load_recording(path), wrap=wrap)


# --------------------------------------------------------------------------- fidelity


FIDELITY_EXPECTED_SCORES = {
    "Pong": [21] * 37,  # every one of 37 finished episodes won 21-0
    "Breakout": [362, 355, 378, 60, 406, 359],
}


def fidelity_problems(recording: Recording, *, complete: bool = True) -> list[str]:
    """Differences between a policy-file recording and the authors' known episode scores.

    complete=False checks only the episodes the (possibly shortened) recording finished.
    Pong's episodes must also be won 21-0 (no point conceded).
    """
    expected = FIDELITY_EXPECTED_SCORES.get(recording.game)
    if expected is None:
        return [f"no fidelity expectation for {recording.game}"]
    problems = []
    scores = recording.episode_scores()
    if complete and len(scores) != len(expected):
        problems.append(f"{recording.game}: {len(scores)} finished episodes, expected {len(expected)}")
    for index, (score, wanted) in enumerate(zip(scores, expected, strict=False)):
        if score != wanted:
            problems.append(f"{recording.game} episode {index + 1}: scored {score}, expected {wanted}")
    if recording.game == "Pong":
        for index, (begin, end) in enumerate(recording.episode_bounds()):
            conceded = int(-recording.raw_reward[begin:end][recording.raw_reward[begin:end] < 0].sum())
            if conceded:
                problems.append(f"Pong episode {index + 1}: conceded {conceded} points")
    return problems


# --------------------------------------------------------------------------- CLI


def _command_record(arguments: argparse.Namespace) -> int:
    for game in arguments.game:
        path = record(game, arguments.policy, policy_dir=arguments.policy_dir, seed=arguments.seed,
                      frames=arguments.frames, ale_seed=arguments.ale_seed, cache_dir=arguments.cache_dir,
                      force=arguments.force, progress=not arguments.quiet)
        recording = load_recording(path)
        metadata = recording.metadata
        rate = metadata["frames"] / max(metadata["recording_seconds"], 1e-9)
        print(f"{metadata['game']}: {len(recording):,} steps, {metadata['episodes_finished']} finished "
              f"episodes, scores {metadata['episode_scores']}; recorded at {rate:,.0f} frames/s -> {path}")
    return 0


def _command_fidelity(arguments: argparse.Namespace) -> int:
    failures = 0
    for game in FIDELITY_EXPECTED_SCORES:
        path = record(game, FILE_POLICY, policy_dir=arguments.policy_dir, cache_dir=arguments.cache_dir,
                      progress=not arguments.quiet)
        recording = load_recording(path)
        problems = fidelity_problems(recording)
        failures += bool(problems)
        verdict = "FAITHFUL" if not problems else "NOT FAITHFUL: " + "; ".join(problems)
        print(f"{game}: {len(recording.episode_scores())} finished episodes, scores "
              f"{recording.episode_scores()} -> {verdict}")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    """Command line: record streams into the cache, or run the full fidelity check."""
    parser = argparse.ArgumentParser(prog="python -m environments.atari", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--policy-dir", help=f"folder of policy files (default: ${POLICY_DIR_ENV}, "
                         "then ../shared/data/atari_policies beside the repository)")
        sub.add_argument("--cache-dir", help="recording cache folder (default: $CCN_CACHE_DIR/atari, "
                         "else ~/.cache/ccn-sweeps/atari)")
        sub.add_argument("--quiet", action="store_true", help="no progress bar")

    record_parser = commands.add_parser("record", help="record game streams into the cache")
    record_parser.add_argument("--game", nargs="+", required=True, help="e.g. Pong or PongNoFrameskip-v4")
    record_parser.add_argument("--policy", default=FILE_POLICY, choices=[FILE_POLICY, *BUILTIN_POLICIES])
    record_parser.add_argument("--frames", type=int, help="stream steps (default: the whole policy file)")
    record_parser.add_argument("--seed", type=int, default=0, help="seed of a built-in policy")
    record_parser.add_argument("--ale-seed", type=int, default=AUTHORS_ALE_SEED)
    record_parser.add_argument("--force", action="store_true", help="record again even if cached")
    common(record_parser)
    record_parser.set_defaults(handler=_command_record)

    fidelity_parser = commands.add_parser(
        "fidelity", help="replay the full Pong and Breakout policy files; compare with the authors' scores")
    common(fidelity_parser)
    fidelity_parser.set_defaults(handler=_command_fidelity)

    arguments = parser.parse_args(argv)
    try:
        return arguments.handler(arguments)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
