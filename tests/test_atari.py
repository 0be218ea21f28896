"""Atari prediction stream: emulator replay, observation layout, recording, cache, fidelity.

Emulator runs are kept short (a few thousand frames each, ~10 s in all). The full fidelity check
(all 37 Pong and 6 Breakout episodes, ~70 s) is `python -m environments.atari fidelity`, or this
file with CCN_ATARI_FULL_FIDELITY=1 (the two games side by side: ~40 s on 2 cores).
"""

from __future__ import annotations

import functools
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest

from environments import atari
from environments.core import StreamStep
from environments.recording import (
    OBSERVATION_SIZE,
    RESET_ACTION,
    EndOfStream,
    RecordedStream,
    Recording,
    future_returns,
    load_recording,
    replay,
    write_recording,
)

PONG_TWO_EPISODES_FRAMES = 13_300  # Pong's second reset is at stream step 13,216
BREAKOUT_FIRST_EPISODE_FRAMES = 6_300  # Breakout's first reset is at stream step 6,215


def _policy_file_or_skip(game: str) -> Path:
    """The game's policy file; outside CI a checkout without ../shared skips, in CI it must be there."""
    try:
        return atari.find_policy_file(game)
    except atari.PolicyNotFoundError as error:
        if os.environ.get("CI"):
            pytest.fail(f"CI must have the policy files (../shared/data/atari_policies): {error}")
        pytest.skip(f"policy files not available here: {error}")


def _has_policy_file(game: str) -> bool:
    try:
        atari.find_policy_file(game)
    except atari.PolicyNotFoundError:
        return False
    return True


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("atari-cache")


@pytest.fixture(scope="module")
def pong(cache_dir: Path) -> Recording:
    """Pong's policy file replayed for its first two episodes (and a little of the third)."""
    _policy_file_or_skip("Pong")
    path = atari.record("Pong", frames=PONG_TWO_EPISODES_FRAMES, cache_dir=cache_dir, progress=False)
    return load_recording(path)


@pytest.fixture(scope="module")
def breakout(cache_dir: Path) -> Recording:
    _policy_file_or_skip("Breakout")
    path = atari.record("Breakout", frames=BREAKOUT_FIRST_EPISODE_FRAMES, cache_dir=cache_dir,
                        progress=False)
    return load_recording(path)


# --------------------------------------------------------------------------- replay


def test_replaying_pong_twice_gives_identical_observations(pong: Recording) -> None:
    again = atari.emulate("PongNoFrameskip-v4", frames=3000, progress=False)
    np.testing.assert_array_equal(again.frames, pong.frames[:3000])
    np.testing.assert_array_equal(again.action, pong.action[:3000])
    np.testing.assert_array_equal(again.observations(0, 3000), pong.observations(0, 3000))
    assert len(np.unique(again.frames, axis=0)) > 100  # the screen really changes


def test_pong_first_episodes_are_won_21_to_0(pong: Recording) -> None:
    assert pong.episode_scores() == [21, 21]
    policy_text = atari.find_policy_file("Pong").read_text()
    assert policy_text[0] == "R" and pong.action[0] == ord(policy_text[1]) - ord("a")  # first skipped
    resets = np.flatnonzero(pong.action == RESET_ACTION)
    np.testing.assert_array_equal(resets + 1, [i for i, c in enumerate(policy_text[:len(pong) + 1])
                                               if c == "R"][1:])
    assert atari.fidelity_problems(pong, complete=False) == []
    assert pong.metadata["ale_seed"] == atari.AUTHORS_ALE_SEED


def test_breakout_first_episode_scores_362(breakout: Recording) -> None:
    assert breakout.episode_scores() == [362]
    assert atari.fidelity_problems(breakout, complete=False) == []


@pytest.mark.skipif(not (os.environ.get("CCN_ATARI_FULL_FIDELITY") or os.environ.get("CI")),
                    reason="full replay takes ~40 s on 2 cores: runs in CI, or set CCN_ATARI_FULL_FIDELITY=1")
@pytest.mark.slow
def test_full_policy_files_reproduce_the_authors_scores(cache_dir: Path) -> None:
    games = [game for game in atari.FIDELITY_EXPECTED_SCORES if _has_policy_file(game)]
    # Each game is one independent emulator run (~35 s): one process per game, side by side (spawned,
    # not forked: this process has JAX's threads). Each records its whole policy file into the cache.
    record_whole_file = functools.partial(atari.record, cache_dir=cache_dir, progress=False)
    with ProcessPoolExecutor(max(1, len(games)), mp_context=multiprocessing.get_context("spawn")) as pool:
        paths = dict(zip(games, pool.map(record_whole_file, games), strict=True))
    for game in games:
        recording = load_recording(paths[game])
        assert recording.game == game
        assert atari.fidelity_problems(recording) == []
    for game in atari.FIDELITY_EXPECTED_SCORES:  # a game without its file: a failure in CI, else a skip
        _policy_file_or_skip(game)


def test_frame_pipeline_equals_cv2_resize_of_the_raw_grayscale_screen(pong: Recording) -> None:
    import ale_py

    policy_text = atari.find_policy_file("Pong").read_text()
    emulator = ale_py.ALEInterface()
    emulator.setInt("random_seed", 1731038949)
    emulator.setFloat("repeat_action_probability", 0.0)
    emulator.setInt("frame_skip", 1)
    emulator.loadROM(str(ale_py.roms.get_rom_path("pong")))
    emulator.reset_game()
    actions = emulator.getMinimalActionSet()
    for t, character in enumerate(policy_text[1:601]):  # the file's first character is skipped
        if character == "R":
            emulator.reset_game()
        else:
            emulator.act(actions[ord(character) - ord("a")])
        screen = emulator.getScreenGrayscale()
        expected = cv2.resize(screen, (16, 16), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_array_equal(pong.frames[t].reshape(16, 16), expected, err_msg=f"frame {t}")


def test_downsample_screen_is_cv2_inter_linear_on_test_images() -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (210, 160), dtype=np.uint8),
              np.tile(np.arange(160, dtype=np.uint8), (210, 1)),
              np.full((210, 160), 255, dtype=np.uint8)]
    for image in images:
        expected = cv2.resize(image, (16, 16), interpolation=cv2.INTER_LINEAR).reshape(256)
        np.testing.assert_array_equal(atari.downsample_screen(image), expected)
    # INTER_LINEAR samples 2x2 neighbours; an area average would differ on noise:
    area = cv2.resize(images[0], (16, 16), interpolation=cv2.INTER_AREA).reshape(256)
    assert not np.array_equal(atari.downsample_screen(images[0]), area)


# --------------------------------------------------------------------------- the stream


def test_observation_layout_frame_one_hot_reward_and_zero_slots_on_reset(breakout: Recording) -> None:
    reset_step = int(np.flatnonzero(breakout.action == RESET_ACTION)[0])
    observation = breakout.observations(0, len(breakout))
    assert observation.shape == (len(breakout), OBSERVATION_SIZE) == (len(breakout), 275)
    assert observation.dtype == np.float32
    np.testing.assert_array_equal(observation[:, :256], breakout.frames.astype(np.float32) / 256)
    assert observation[:, :256].max() < 1.0
    one_hot = observation[:, 256:274]
    acted = breakout.action != RESET_ACTION
    np.testing.assert_array_equal(one_hot.sum(axis=1), acted.astype(np.float32))
    np.testing.assert_array_equal(one_hot[acted].argmax(axis=1), breakout.action[acted])
    # Breakout's bricks are worth 1, 4 and 7 raw points; the reward slot holds the clipped value.
    assert breakout.raw_reward.max() == 7
    np.testing.assert_array_equal(observation[:, 274], np.clip(breakout.raw_reward, -1, 1))
    np.testing.assert_array_equal(breakout.cumulant, np.clip(breakout.raw_reward, -1, 1))
    assert not one_hot[reset_step].any() and observation[reset_step, 274] == 0
    assert breakout.gamma[reset_step] == 0 and breakout.gamma[0] == 0
    assert set(np.unique(np.delete(breakout.gamma, [0, reset_step])).tolist()) == {np.float32(0.98)}


def test_true_return_sums_future_cumulants_and_the_unfinished_tail_is_nan(pong: Recording) -> None:
    resets = np.flatnonzero(pong.action == RESET_ACTION)
    last_reset = int(resets[-1])
    returns = pong.true_return.astype(np.float64)
    assert np.isnan(returns[last_reset:]).all() and not np.isnan(returns[:last_reset]).any()
    # G_t = c_{t+1} + gamma_{t+1} G_{t+1}, cut by the reset step's gamma 0.
    t = np.arange(last_reset - 1)
    expected = pong.cumulant[t + 1] + pong.gamma[t + 1] * np.nan_to_num(returns[t + 1])
    np.testing.assert_allclose(returns[t], expected, rtol=1e-5, atol=1e-5)
    assert returns[resets[0] - 1] == 0.0  # the last step of an episode predicts nothing more
    # A point scored at step s is seen by G_{s-1} as 1 and by G_{s-1-k} as 0.98^k:
    scored = int(np.flatnonzero(pong.cumulant[: resets[0]] == 1)[-1])
    assert returns[scored - 1] == pytest.approx(1.0)
    assert returns[scored - 11] == pytest.approx(0.98**10, rel=1e-5)


def test_future_returns_by_hand() -> None:
    cumulant = np.array([5, 1, 2, 0, 3, 4], dtype=np.float32)
    gamma = np.array([0, 0.5, 0.5, 0, 0.5, 0.5], dtype=np.float32)
    # episode [0, 3): G_2 = 0 (next is a reset), G_1 = 2, G_0 = 1 + 0.5 * 2; tail [3, 6): NaN
    np.testing.assert_array_equal(future_returns(cumulant, gamma)[:3], [2.0, 2.0, 0.0])
    assert np.isnan(future_returns(cumulant, gamma)[3:]).all()


def test_take_continues_and_raises_past_the_end_unless_wrapping(pong: Recording) -> None:
    stream = RecordedStream(pong)
    first, second = stream.take(100), stream.take(50)
    assert isinstance(first, StreamStep) and first.observation.shape == (100, 275)
    np.testing.assert_array_equal(second.observation, pong.observations(100, 150))
    np.testing.assert_array_equal(second.true_return, pong.true_return[100:150])
    stream.take(len(pong) - 150)
    with pytest.raises(EndOfStream, match="wrap=True"):
        stream.take(1)
    wrapping = RecordedStream(pong, wrap=True)
    wrapping.take(len(pong) - 10)
    across = wrapping.take(30)
    np.testing.assert_array_equal(across.gamma[10:], pong.gamma[:20])
    assert across.gamma[10] == 0  # the wrap starts a new episode


def test_replay_yields_device_ready_chunks_of_any_length(pong: Recording) -> None:
    chunks = list(replay(pong, 4096, stop=10_000))
    assert [len(chunk.cumulant) for chunk in chunks] == [4096, 4096, 1808]
    assert all(chunk.observation.dtype == np.float32 and chunk.observation.flags.c_contiguous
               for chunk in chunks)
    joined = np.concatenate([chunk.observation for chunk in chunks])
    np.testing.assert_array_equal(joined, pong.observations(0, 10_000))


# --------------------------------------------------------------------------- recording and cache


def test_recording_reads_back_bit_identical(tmp_path: Path) -> None:
    recorded = atari.emulate("Asterix", "sticky_random", seed=3, frames=1500, progress=False)
    path = write_recording(tmp_path / "asterix.parquet", recorded)
    loaded = load_recording(path)
    for name in ("frames", "action", "raw_reward", "cumulant", "gamma", "true_return"):
        original, read_back = getattr(recorded, name), getattr(loaded, name)
        assert read_back.dtype == original.dtype, name
        np.testing.assert_array_equal(read_back, original, err_msg=name)
    assert {key: loaded.metadata[key] for key in recorded.metadata} == recorded.metadata
    assert loaded.metadata["length"] == 1500 and loaded.metadata["format_version"] == 1
    assert load_recording(path) is loaded  # one loaded copy per process
    assert not list(tmp_path.glob("*.tmp"))  # the temporary file was renamed away


def test_second_record_request_hits_the_cache(tmp_path: Path) -> None:
    runs_before = atari.EMULATOR_RUNS["asterix"]
    path = atari.record("Asterix", "random", seed=1, frames=800, cache_dir=tmp_path, progress=False)
    modified = path.stat().st_mtime_ns
    assert atari.EMULATOR_RUNS["asterix"] == runs_before + 1
    again = atari.record("AsterixNoFrameskip-v4", "random", seed=1, frames=800, cache_dir=tmp_path,
                         progress=False)
    assert again == path and path.stat().st_mtime_ns == modified
    assert atari.EMULATOR_RUNS["asterix"] == runs_before + 1
    other_seed = atari.record("Asterix", "random", seed=2, frames=800, cache_dir=tmp_path, progress=False)
    assert other_seed != path and atari.EMULATOR_RUNS["asterix"] == runs_before + 2
    metadata = load_recording(path).metadata
    assert metadata["game"] == "Asterix" and metadata["policy"] == "random" and metadata["seed"] == 1
    assert metadata["ale_py_version"] and metadata["frames"] == 800


def test_policy_file_streams_share_one_recording_whatever_the_seed(pong: Recording, cache_dir: Path) -> None:
    runs_before = atari.EMULATOR_RUNS["pong"]
    streams = [atari.make_atari_stream("Pong", seed=seed, frames=PONG_TWO_EPISODES_FRAMES,
                                       cache_dir=cache_dir) for seed in range(3)]
    assert atari.EMULATOR_RUNS["pong"] == runs_before
    assert all(stream.recording is pong for stream in streams)
    assert pong.metadata["policy_sha256"] and len(pong.metadata["policy_sha256"]) == 64


# --------------------------------------------------------------------------- policies and names


def test_missing_policy_file_error_names_the_game_and_every_searched_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(atari.PolicyNotFoundError) as caught:
        atari.make_atari_stream("Pong", policy_dir=tmp_path)
    assert isinstance(caught.value, FileNotFoundError)
    assert "Pong" in str(caught.value) and str(tmp_path) in str(caught.value)
    first, second = tmp_path / "first", tmp_path / "second"
    monkeypatch.setenv(atari.POLICY_DIR_ENV, f"{first}{os.pathsep}{second}")
    with pytest.raises(atari.PolicyNotFoundError) as caught:
        atari.record("Breakout", cache_dir=tmp_path)
    message = str(caught.value)
    assert "Breakout" in message and str(first) in message and str(second) in message
    assert atari.POLICY_DIR_ENV in message


def test_policy_dir_environment_variable_and_argument_are_searched(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "PongNoFrameskip-v4.txt").write_text("Rab")
    assert atari.find_policy_file("Pong", policy_dir=tmp_path) == tmp_path / "PongNoFrameskip-v4.txt"
    monkeypatch.setenv(atari.POLICY_DIR_ENV, str(tmp_path))
    assert atari.find_policy_file("PongNoFrameskip-v4") == tmp_path / "PongNoFrameskip-v4.txt"
    monkeypatch.delenv(atari.POLICY_DIR_ENV)
    defaults = [directory for directory, _origin in atari.policy_search_dirs()]
    # the search list holds resolved paths (a symlinked ../shared is searched once, at its target)
    assert defaults[0] == (Path(atari.__file__).resolve().parents[2] / "shared" / "data" / "atari_policies").resolve()


def test_policy_file_with_an_impossible_action_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "PongNoFrameskip-v4.txt").write_text("Rabz")
    with pytest.raises(ValueError, match="position 3"):
        atari.emulate("Pong", policy_dir=tmp_path, progress=False)


def test_game_names_resolve_to_ale_rom_ids() -> None:
    assert atari.resolve_game("Pong") == atari.AtariGame("Pong", "pong")
    assert atari.resolve_game("PongNoFrameskip-v4") == atari.AtariGame("Pong", "pong")
    assert atari.resolve_game("MontezumaRevengeNoFrameskip-v4").rom_id == "montezuma_revenge"
    assert atari.resolve_game("UpNDown").rom_id == "up_n_down"
    assert atari.resolve_game("ALE/Breakout-v5").name == "Breakout"
    with pytest.raises(ValueError, match="Did you mean Pong"):
        atari.resolve_game("Pongg")


def test_builtin_random_policies_are_seeded_finite_and_reset_on_game_over(tmp_path: Path) -> None:
    import ale_py

    recording = atari.emulate("Asterix", "sticky_random", seed=7, frames=2500, policy_dir=tmp_path,
                              progress=False)
    assert len(recording) == 2500 and len(recording.episode_scores()) >= 1
    shorter = atari.emulate("Asterix", "sticky_random", seed=7, frames=1000, progress=False)
    np.testing.assert_array_equal(shorter.action, recording.action[:1000])
    other = atari.emulate("Asterix", "random", seed=8, frames=1000, progress=False)
    assert not np.array_equal(other.action, shorter.action)
    acted = recording.action[recording.action != RESET_ACTION]
    action_count = recording.metadata["minimal_action_count"]
    repeats = np.mean(acted[1:] == acted[:-1])  # sticky repeats plus equal fresh draws by chance
    expected = atari.STICKY_REPEAT_PROBABILITY + (1 - atari.STICKY_REPEAT_PROBABILITY) / action_count
    assert abs(repeats - expected) < 0.05
    # Replaying the recorded actions directly: every reset step follows a game over, and only those.
    emulator = atari._make_emulator("asterix", atari.AUTHORS_ALE_SEED)
    actions = emulator.getMinimalActionSet()
    assert isinstance(emulator, ale_py.ALEInterface)
    for t, code in enumerate(recording.action.tolist()):
        assert (code == RESET_ACTION) == emulator.game_over(), f"step {t}"
        if code == RESET_ACTION:
            emulator.reset_game()
        else:
            assert emulator.act(actions[code]) == recording.raw_reward[t]


def test_command_line_records_and_reports_a_missing_file_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = atari.main(["record", "--game", "Asterix", "--policy", "random", "--frames", "300",
                         "--cache-dir", str(tmp_path), "--quiet"])
    assert status == 0 and len(list(tmp_path.glob("Asterix-random-300-*.parquet"))) == 1
    assert "Asterix: 300 steps" in capsys.readouterr().out
    status = atari.main(["record", "--game", "Pong", "--policy-dir", str(tmp_path / "nowhere"), "--quiet"])
    error = capsys.readouterr().err
    assert status == 2 and error.count("\n") == 1 and "Pong" in error and "nowhere" in error
