"""Throughput of the task streams (not a test): `python benchmarks/streams.py`."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __name__ == "__main__":  # run as a script from a checkout: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def bench_animal(batch_sizes: tuple[int, ...] = (64, 512), steps: int = 10_000) -> dict[str, float]:
    """Animal learning: generated steps/s of the paper's trace patterning, a vmapped batch of streams.

    One jitted `vmap(scan)` per batch size advances every stream `steps` steps; the steps are
    consumed inside the scan (summed), as a learner would, so nothing [batch, steps, 12] is stored.
    steps/s counts all streams (batch x steps / seconds); best of 3 calls after compilation.
    """
    import jax
    import jax.numpy as jnp

    from environments import make_device_stream, split_run_seed

    stream = make_device_stream("trace_patterning", variant="paper")
    results: dict[str, float] = {}
    device = jax.devices()[0]
    print(f"Animal learning (trace_patterning, variant paper), {steps:,} steps per stream on "
          f"{device.platform} ({device.device_kind}):")

    def run_one(key):
        def body(carry, _):
            state, total = carry
            state, step = stream.step(state)
            return (state, total + step.observation.sum() + step.true_return), None

        (_, total), _ = jax.lax.scan(body, (stream.init(key), jnp.float32(0)), None, length=steps)
        return total

    for batch in batch_sizes:
        env_keys, _ = jax.vmap(split_run_seed)(jnp.arange(batch))
        run_batch = jax.jit(jax.vmap(run_one))
        started = time.perf_counter()
        jax.block_until_ready(run_batch(env_keys))
        compile_seconds = time.perf_counter() - started
        best_seconds = float("inf")
        for _pass in range(3):
            started = time.perf_counter()
            jax.block_until_ready(run_batch(env_keys))
            best_seconds = min(best_seconds, time.perf_counter() - started)
        rate = batch * steps / best_seconds
        results[f"animal_steps_per_s/{batch}"] = rate
        print(f"  batch {batch:>5}: {rate:14,.0f} steps/s ({rate / batch:10,.0f} per stream; "
              f"first call incl. compilation {compile_seconds:.1f} s)")
    return results


def bench_atari(games: tuple[str, ...] = ("Pong", "Breakout", "SpaceInvaders"), frames: int = 4000,
                replay_steps: int = 250_000) -> dict[str, float]:
    """Atari: recording frames/s per game, and replay steps/s delivered as device-ready chunks.

    Recording runs the emulator under the game's policy file (or sticky_random when the files
    are not found) for `frames` frames; the bare emulator (act only, no screen) replays the same
    actions alongside. Both rates time the frame loop only (wall clock: a busy machine lowers them).
    Replay tiles the first game's recording to `replay_steps` steps (a full game's length), writes it
    as a recording file, loads it, and times StreamStep chunks (observation float32 [n, 275]).
    """
    import ale_py
    import jax

    from environments import atari
    from environments.recording import Recording, forget_loaded_recordings, load_recording, replay
    from environments.recording import write_recording as write

    results: dict[str, float] = {}
    recordings: list[Recording] = []
    print(f"Atari recording, {frames:,} frames per game (frame_skip 1, 16x16 grayscale pipeline):")
    for game in games:
        try:
            atari.find_policy_file(game)
            policy = atari.FILE_POLICY
        except atari.PolicyNotFoundError:
            policy = "sticky_random"
        recording = atari.emulate(game, policy, frames=frames, progress=False)
        recording_rate = frames / recording.metadata["recording_seconds"]  # the frame loop, not ROM loading
        recordings.append(recording)

        emulator = atari._make_emulator(atari.resolve_game(game).rom_id, atari.AUTHORS_ALE_SEED)
        actions = emulator.getMinimalActionSet()
        started = time.perf_counter()
        for code in recording.action.tolist():
            if code == atari.RESET_ACTION:
                emulator.reset_game()
            else:
                emulator.act(actions[code])
        bare_rate = frames / (time.perf_counter() - started)
        results[f"record_frames_per_s/{game}"] = recording_rate
        results[f"bare_emulator_frames_per_s/{game}"] = bare_rate
        print(f"  {game:<14} policy {policy:<13} record {recording_rate:8,.0f} frames/s   "
              f"bare emulator {bare_rate:8,.0f} frames/s")

    source = recordings[0]
    repeats = -(-replay_steps // len(source))
    tiled = Recording(
        frames=np.tile(source.frames, (repeats, 1))[:replay_steps],
        **{name: np.tile(getattr(source, name), repeats)[:replay_steps]
           for name in ("action", "raw_reward", "cumulant", "gamma", "true_return")},
        metadata=dict(source.metadata),
    )
    with tempfile.TemporaryDirectory() as directory:
        path = write(Path(directory) / "tiled.parquet", tiled)
        forget_loaded_recordings()
        started = time.perf_counter()
        loaded = load_recording(path)
        load_seconds = time.perf_counter() - started
    print(f"Atari replay of {replay_steps:,} steps ({games[0]}'s recording tiled; its file size is not "
          f"representative): loaded in {load_seconds:.2f} s")
    results["replay_load_seconds"] = load_seconds
    device = jax.devices()[0]
    for chunk_steps in (1_000, 10_000, 100_000):
        for to_device in (False, True):
            best_seconds = float("inf")
            for _pass in range(3):  # best of 3 passes: the machine may be shared
                started = time.perf_counter()
                delivered = 0
                for chunk in replay(loaded, chunk_steps, device=device if to_device else None):
                    if to_device:
                        jax.block_until_ready(chunk)
                    delivered += len(chunk.cumulant)
                best_seconds = min(best_seconds, time.perf_counter() - started)
            rate = delivered / best_seconds
            where = f"on {device.platform}" if to_device else "numpy"
            results[f"replay_steps_per_s/{chunk_steps}/{where}"] = rate
            print(f"  chunks of {chunk_steps:>7,} steps ({where:<8}) {rate:12,.0f} steps/s")
    print(f"  (ale-py {ale_py.__version__}; recording uses one core; replay: best of 3 passes)")
    return results


if __name__ == "__main__":
    bench_animal()
    try:
        import ale_py  # noqa: F401
    except ImportError:
        print("Atari: skipped (ale-py is not installed)")
    else:
        bench_atari()
