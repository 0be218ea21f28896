"""Animal-learning (classical conditioning) prediction tasks as pure JAX device streams.

Every task is a sequence of trials: a conditioned stimulus (CS) at the trial's onset, an
unconditioned stimulus (US, the cumulant) an inter-stimulus interval (ISI) later for reinforced
trials, then an inter-trial interval (ITI). One engine, `ConditioningStream`, covers them all; the
builders below fix its fields for each task and variant (docs/environments.md):

    paper_trace_patterning     BENCHMARKS.md 1a, what the CCN paper's code ran
    rafiee_trace_conditioning  BENCHMARKS.md 1b, the Rafiee et al. (2022) reference definitions
    rafiee_trace_patterning
    rafiee_noisy_patterning

A stream is a frozen (hashable) dataclass, so jitted code can close over it; `init(key)` and
`step(state)` are pure and vmappable over keys. Randomness is addressed, not carried: a trial's
draws are the threefry hash of (trial_key, trial_index, word) and a step's of (step_key, step_count,
word), so the stream does not depend on how it is chunked and future trials can be looked at early.
The true return is computed online from the state's queue of the current and the next
`lookahead_trials` trials (their US times are known when they are drawn).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.random import threefry_2x32

from environments.core import StreamStep

# Constants folded into a run's seed to derive independent environment and learner keys.
ENV_KEY_TAG = 0x656E76  # "env"
LEARNER_KEY_TAG = 0x6C726E  # "lrn"

# The reference's gamma for each nominal ISI (its exp.py `gamma_dict`).
RAFIEE_GAMMA_BY_ISI = {4: 0.75, 5: 0.8, 10: 0.9, 20: 0.95, 30: 0.966, 40: 0.975, 80: 0.9875}

# Contributions of trials beyond the lookahead queue to the true return are bounded by this.
RETURN_TAIL_TOLERANCE = 1e-8
MAX_LOOKAHEAD_TRIALS = 256

PATTERN_RULES = ("single_cs", "uniform_half_on", "reference_mixture")
DISTRACTOR_RULES = ("bernoulli_each_step", "onset_when_idle", "pattern_at_trial_start")


def split_run_seed(seed: int | jax.Array) -> tuple[jax.Array, jax.Array]:
    """Derive (env_key, learner_key) from one run seed; vmappable over an int array of seeds.

    env_key = fold_in(key(seed), ENV_KEY_TAG), learner_key = fold_in(key(seed), LEARNER_KEY_TAG):
    the environment and the learner's initialisation are driven by the same run seed (as in the
    authors' code) yet draw from independent streams.
    """
    base = jax.random.key(seed)
    return jax.random.fold_in(base, ENV_KEY_TAG), jax.random.fold_in(base, LEARNER_KEY_TAG)


@functools.cache
def half_on_patterns(num_cs: int) -> np.ndarray:
    """All binary patterns with num_cs // 2 of num_cs bits on, lexicographic: [C(n, n//2), n] f32."""
    combos = list(itertools.combinations(range(num_cs), num_cs // 2))
    table = np.zeros((len(combos), num_cs), np.float32)
    for row, on_bits in enumerate(combos):
        table[row, list(on_bits)] = 1.0
    table.setflags(write=False)
    return table


def distractor_probabilities(num_distractors: int) -> np.ndarray:
    """Distractor k (k = 1..m) fires with probability 1 / (10 k): [m] f32."""
    return (1.0 / (10.0 * np.arange(1, num_distractors + 1))).astype(np.float32)


class Trial(NamedTuple):
    """One trial's schedule; in the state each field has a leading [lookahead_trials + 1] axis.

    onset:              []          int32  CS onset, in steps after the current trial's onset
    isi:                []          int32  steps from CS onset to US onset
    length:             []          int32  steps from this trial's onset to the next one's
    has_us:             []          bool   whether the US follows (reinforced trial)
    cs_pattern:         [num_cs]    f32    CS bits shown at onset
    distractor_pattern: [num_distr] f32    distractors started at onset (trial-start rule only)
    """

    onset: jax.Array
    isi: jax.Array
    length: jax.Array
    has_us: jax.Array
    cs_pattern: jax.Array
    distractor_pattern: jax.Array


class ConditioningState(NamedTuple):
    """A conditioning stream's state (per run; vmap adds a leading batch axis).

    trial_key, step_key:   [2] uint32 threefry keys, hashed with the trial index / step count
    reinforced_patterns:   [num_reinforced, num_cs] f32  valid (paper) / activation (rafiee) patterns
    step_count:            []  uint32  steps emitted so far (wraps after 2^32: keys repeat)
    phase:                 []  int32   steps since the current trial's onset
    trial_index:           []  int32   index of the current trial
    trials:                Trial with leading axis [lookahead_trials + 1]; trials[0] is current
    distractor_run_length: [num_distractors] int32  steps a distractor has been on (0 = off)
    """

    trial_key: jax.Array
    step_key: jax.Array
    reinforced_patterns: jax.Array
    step_count: jax.Array
    phase: jax.Array
    trial_index: jax.Array
    trials: Trial
    distractor_run_length: jax.Array


@dataclass(frozen=True)
class ConditioningStream:
    """A classical-conditioning stream: static description + pure `init` / `step` (DeviceStream).

    Observation layout: [CS..., US, distractors...] (paper) or [US, CS..., distractors...]
    (rafiee, `us_first`). Stimulus durations in steps: cs_steps, us_steps, distractor_steps.
    A trial lasts isi + iti + trial_extra_steps steps (paper: +1, rafiee: +0).
    True return: sum over pending US steps u of gamma^(u - t - 1) (the cumulant of the current step
    excluded) or gamma^(u - t) when `return_includes_current_cumulant`; trials after the next
    `lookahead_trials` are left out (bounded by RETURN_TAIL_TOLERANCE when chosen automatically).
    """

    task: str
    variant: str
    num_cs: int
    num_distractors: int
    cs_steps: int
    us_steps: int
    distractor_steps: int
    isi_range: tuple[int, int]
    iti_range: tuple[int, int]
    trial_extra_steps: int
    gamma: float
    pattern_rule: str
    num_reinforced_patterns: int
    reference_pattern_probability: float
    us_noise: float
    distractor_rule: str
    us_first: bool
    return_includes_current_cumulant: bool
    lookahead_trials: int

    @property
    def observation_size(self) -> int:
        return 1 + self.num_cs + self.num_distractors

    @property
    def name(self) -> str:
        return f"{self.task}/{self.variant}"

    # ---- device form -------------------------------------------------------------------------

    def init(self, key: jax.Array) -> ConditioningState:
        """State at the first trial's onset; `key` is the environment key (split_run_seed)."""
        key_words = jax.random.bits(key, (6,), jnp.uint32)  # works for any PRNG key type
        pattern_key, trial_key, step_key = key_words[0:2], key_words[2:4], key_words[4:6]
        reinforced = self._draw_reinforced_patterns(pattern_key)
        queue = jax.vmap(lambda index: self._draw_trial(trial_key, reinforced, index))(
            jnp.arange(self.lookahead_trials + 1, dtype=jnp.int32)
        )
        queue = queue._replace(onset=jnp.cumsum(queue.length) - queue.length)
        return ConditioningState(
            trial_key=trial_key,
            step_key=step_key,
            reinforced_patterns=reinforced,
            step_count=jnp.zeros((), jnp.uint32),
            phase=jnp.zeros((), jnp.int32),
            trial_index=jnp.zeros((), jnp.int32),
            trials=queue,
            distractor_run_length=jnp.zeros((self.num_distractors,), jnp.int32),
        )

    def step(self, state: ConditioningState) -> tuple[ConditioningState, StreamStep]:
        """Emit the current step (observation [d], cumulant, gamma, true_return) and advance."""
        current = jax.tree.map(lambda field: field[0], state.trials)
        phase = state.phase
        cs_bits = current.cs_pattern * (phase < self.cs_steps)
        us_on = current.has_us & (phase >= current.isi) & (phase < current.isi + self.us_steps)
        us_bit = us_on.astype(jnp.float32)[None]
        distractor_bits, run_length = self._distractors(state, current)
        parts = [us_bit, cs_bits, distractor_bits] if self.us_first else [cs_bits, us_bit, distractor_bits]
        observation = jnp.concatenate(parts).astype(jnp.float32)
        stream_step = StreamStep(
            observation=observation,
            cumulant=us_on.astype(jnp.float32),
            gamma=jnp.float32(self.gamma),
            true_return=self._true_return(state.trials, phase),
        )
        next_phase = phase + 1
        trial_ends = next_phase >= current.length
        trials = jax.lax.cond(
            trial_ends,
            lambda: self._next_queue(state),
            lambda: state.trials,
        )
        next_state = state._replace(
            step_count=state.step_count + jnp.uint32(1),
            phase=jnp.where(trial_ends, 0, next_phase),
            trial_index=state.trial_index + trial_ends.astype(jnp.int32),
            trials=trials,
            distractor_run_length=run_length,
        )
        return next_state, stream_step

    # ---- pieces ------------------------------------------------------------------------------

    def _draw_reinforced_patterns(self, key: jax.Array) -> jax.Array:
        """[num_reinforced, num_cs] f32: distinct half-on patterns (one all-on CS in trace conditioning)."""
        if self.pattern_rule == "single_cs":
            return jnp.ones((1, self.num_cs), jnp.float32)
        table = jnp.asarray(half_on_patterns(self.num_cs))
        shuffled_rows = jnp.argsort(_hash_words(key, jnp.uint32(0), table.shape[0]))
        return table[shuffled_rows[: self.num_reinforced_patterns]]

    def _draw_trial(self, trial_key: jax.Array, reinforced: jax.Array, trial_index: jax.Array) -> Trial:
        """Trial `trial_index`'s schedule (onset left at 0; the queue sets it).

        All of a trial's draws come from one block of random 32-bit words (cheap to compile).
        """
        words = _hash_words(trial_key, trial_index, 5 + self.num_cs + self.num_distractors)
        isi = _integer_from_bits(words[0], *self.isi_range)
        iti = _integer_from_bits(words[1], *self.iti_range)
        pattern_bits = _coin_from_bits(words[5 : 5 + self.num_cs])
        if self.pattern_rule == "single_cs":
            pattern = jnp.ones((self.num_cs,), jnp.float32)
            has_us = jnp.bool_(True)
        elif self.pattern_rule == "uniform_half_on":
            table = jnp.asarray(half_on_patterns(self.num_cs))
            pattern = table[_integer_from_bits(words[2], 0, table.shape[0] - 1)]
            has_us = _matches_any(pattern, reinforced)
        else:  # reference_mixture
            from_reinforced = _uniform_from_bits(words[3]) < self.reference_pattern_probability
            chosen = reinforced[_integer_from_bits(words[2], 0, reinforced.shape[0] - 1)]
            pattern = jnp.where(from_reinforced, chosen, pattern_bits)
            flipped = _uniform_from_bits(words[4]) < self.us_noise
            has_us = _matches_any(pattern, reinforced) != flipped
        if self.distractor_rule == "pattern_at_trial_start":
            distractors = _coin_from_bits(words[5 + self.num_cs :])
        else:
            distractors = jnp.zeros((self.num_distractors,), jnp.float32)
        return Trial(
            onset=jnp.zeros((), jnp.int32),
            isi=isi,
            length=isi + iti + self.trial_extra_steps,
            has_us=has_us,
            cs_pattern=pattern,
            distractor_pattern=distractors,
        )

    def _next_queue(self, state: ConditioningState) -> Trial:
        """Drop the finished trial, append trial `trial_index + lookahead + 1`, rebase onsets."""
        queue = state.trials
        newest = self._draw_trial(
            state.trial_key, state.reinforced_patterns, state.trial_index + self.lookahead_trials + 1
        )
        newest = newest._replace(onset=queue.onset[-1] + queue.length[-1])
        shifted = jax.tree.map(lambda q, x: jnp.concatenate([q[1:], x[None]]), queue, newest)
        return shifted._replace(onset=shifted.onset - queue.length[0])

    def _distractors(self, state: ConditioningState, current: Trial) -> tuple[jax.Array, jax.Array]:
        """Distractor bits [num_distractors] f32 for this step, and the updated run lengths."""
        run_length = state.distractor_run_length
        if self.num_distractors == 0:
            return jnp.zeros((0,), jnp.float32), run_length
        if self.distractor_rule == "pattern_at_trial_start":
            return current.distractor_pattern * (state.phase < self.distractor_steps), run_length
        draws = _uniform_from_bits(_hash_words(state.step_key, state.step_count, self.num_distractors))
        fires = draws < jnp.asarray(distractor_probabilities(self.num_distractors))
        if self.distractor_rule == "bernoulli_each_step":
            return fires.astype(jnp.float32), run_length
        # onset_when_idle: an idle distractor fires with its probability and stays on for
        # distractor_steps steps; the step after a run is always off (no draw is made on it).
        was_on = run_length > 0
        continued = jnp.where(run_length >= self.distractor_steps, 0, run_length + 1)
        run_length = jnp.where(was_on, continued, fires.astype(jnp.int32))
        return (run_length > 0).astype(jnp.float32), run_length

    def _true_return(self, queue: Trial, phase: jax.Array) -> jax.Array:
        """Discounted sum of the queue's pending US steps, seen from `phase`: [] f32."""
        us_offsets = jnp.arange(self.us_steps, dtype=jnp.int32)
        us_time = (queue.onset + queue.isi)[:, None] + us_offsets[None, :]  # [queue, us_steps]
        exponent = us_time - phase - (0 if self.return_includes_current_cumulant else 1)
        counted = queue.has_us[:, None] & (exponent >= 0)
        discount = jnp.float32(self.gamma) ** jnp.maximum(exponent, 0).astype(jnp.float32)
        return jnp.sum(jnp.where(counted, discount, 0.0)).astype(jnp.float32)


def _hash_words(key: jax.Array, index: jax.Array, count: int) -> jax.Array:
    """`count` random uint32 words addressed by (key [2] uint32, index, word number): [count]."""
    counters = jnp.concatenate(
        [jnp.full((count,), index, jnp.uint32), jnp.arange(count, dtype=jnp.uint32)]
    )
    return threefry_2x32(key, counters)[:count]


def _uniform_from_bits(words: jax.Array) -> jax.Array:
    """Uniform floats in [0, 1) with 24-bit resolution from uint32 words (same shape)."""
    return (words >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)


def _integer_from_bits(words: jax.Array, low: int, high: int) -> jax.Array:
    """Uniform integers in [low, high] (inclusive) from uint32 words; modulo bias < 2^-32 * span."""
    return low + (words % jnp.uint32(high - low + 1)).astype(jnp.int32)


def _coin_from_bits(words: jax.Array) -> jax.Array:
    """Fair 0/1 floats from uint32 words (their top bit)."""
    return (words >> 31).astype(jnp.float32)


def _matches_any(pattern: jax.Array, patterns: jax.Array) -> jax.Array:
    """Whether `pattern` [n] equals a row of `patterns` [k, n]: [] bool."""
    return jnp.any(jnp.all(patterns == pattern[None, :], axis=1))


# ---- builders: one per (task, variant) ----------------------------------------------------------


def paper_trace_patterning(
    *,
    isi_range: tuple[int, int] = (24, 36),
    iti_range: tuple[int, int] = (80, 120),
    gamma: float = 0.9,
    lookahead_trials: int | None = None,
) -> ConditioningStream:
    """BENCHMARKS.md 1a: 6 CS (3 on, 1 step), 1 US (1 step), 5 per-step Bernoulli distractors.

    10 of the 20 half-on patterns are drawn per run as valid; a trial lasts ISI + ITI + 1 steps.
    """
    where = "trace_patterning (variant 'paper')"
    isi_range = _check_range(where, "isi_range", isi_range, minimum=1)
    iti_range = _check_range(where, "iti_range", iti_range, minimum=1)
    gamma = _check_gamma(where, gamma)
    stream = ConditioningStream(
        task="trace_patterning",
        variant="paper",
        num_cs=6,
        num_distractors=5,
        cs_steps=1,
        us_steps=1,
        distractor_steps=1,
        isi_range=isi_range,
        iti_range=iti_range,
        trial_extra_steps=1,
        gamma=gamma,
        pattern_rule="uniform_half_on",
        num_reinforced_patterns=10,
        reference_pattern_probability=0.0,
        us_noise=0.0,
        distractor_rule="bernoulli_each_step",
        us_first=False,
        return_includes_current_cumulant=False,
        lookahead_trials=0,
    )
    return _with_lookahead(where, stream, lookahead_trials)


def rafiee_trace_conditioning(
    *,
    isi: int = 10,
    gamma: float | None = None,
    num_distractors: int = 10,
    iti_range: tuple[int, int] = (80, 120),
    return_includes_current_cumulant: bool = False,
    lookahead_trials: int | None = None,
) -> ConditioningStream:
    """Reference TraceConditioning: one CS (4 steps), US (2 steps) ISI ~ U[isi -+ isi//3] later.

    Distractor d (d = 0..m-1) starts, when idle, with probability 1 / (10 (d + 1)) and lasts 4 steps.
    gamma defaults to the reference's table for `isi` (RAFIEE_GAMMA_BY_ISI).
    """
    where = "trace_conditioning (variant 'rafiee')"
    isi = _check_int(where, "isi", isi, minimum=1)
    stream = ConditioningStream(
        task="trace_conditioning",
        variant="rafiee",
        num_cs=1,
        num_distractors=_check_int(where, "num_distractors", num_distractors, minimum=0),
        cs_steps=4,
        us_steps=2,
        distractor_steps=4,
        isi_range=(isi - isi // 3, isi + isi // 3),
        iti_range=_check_range(where, "iti_range", iti_range, minimum=4),
        trial_extra_steps=0,
        gamma=_rafiee_gamma(where, isi, gamma),
        pattern_rule="single_cs",
        num_reinforced_patterns=1,
        reference_pattern_probability=1.0,
        us_noise=0.0,
        distractor_rule="onset_when_idle",
        us_first=True,
        return_includes_current_cumulant=_check_bool(
            where, "return_includes_current_cumulant", return_includes_current_cumulant
        ),
        lookahead_trials=0,
    )
    return _with_lookahead(where, stream, lookahead_trials)


def rafiee_trace_patterning(
    *,
    isi: int = 10,
    gamma: float | None = None,
    num_cs: int = 6,
    num_activation_patterns: int = 10,
    num_distractors: int = 10,
    noise: float = 0.0,
    iti_range: tuple[int, int] = (80, 120),
    return_includes_current_cumulant: bool = False,
    lookahead_trials: int | None = None,
) -> ConditioningStream:
    """Reference TracePatterning: CS pattern (4 steps), US (2 steps) ISI ~ U[isi -+ isi//3] later.

    With probability (2^n / 2 - k) / (2^n - k) the pattern is one of the k activation patterns
    (n//2 of n bits on, drawn per run), else uniformly random bits; the US follows iff the pattern
    is an activation pattern, flipped with probability `noise`. Distractors: random bits at trial
    onset, each on for 4 steps.
    """
    where = "trace_patterning (variant 'rafiee')"
    isi = _check_int(where, "isi", isi, minimum=1)
    return _rafiee_patterning(
        where,
        task="trace_patterning",
        isi_range=(isi - isi // 3, isi + isi // 3),
        gamma=_rafiee_gamma(where, isi, gamma),
        num_cs=num_cs,
        num_activation_patterns=num_activation_patterns,
        num_distractors=num_distractors,
        noise=noise,
        iti_range=iti_range,
        return_includes_current_cumulant=return_includes_current_cumulant,
        lookahead_trials=lookahead_trials,
    )


def rafiee_noisy_patterning(
    *,
    gamma: float = 0.9,
    noise: float = 0.1,
    num_cs: int = 6,
    num_activation_patterns: int = 10,
    num_distractors: int = 10,
    iti_range: tuple[int, int] = (80, 120),
    return_includes_current_cumulant: bool = False,
    lookahead_trials: int | None = None,
) -> ConditioningStream:
    """Reference NoisyPatterning: trace patterning with the ISI fixed to the CS duration (4 steps).

    The reference takes gamma from its nominal-ISI table (its CLI default ISI 10 gives 0.9), while
    the ISI used is the CS duration; here gamma is given directly.
    """
    where = "noisy_patterning (variant 'rafiee')"
    return _rafiee_patterning(
        where,
        task="noisy_patterning",
        isi_range=(4, 4),
        gamma=_check_gamma(where, gamma),
        num_cs=num_cs,
        num_activation_patterns=num_activation_patterns,
        num_distractors=num_distractors,
        noise=noise,
        iti_range=iti_range,
        return_includes_current_cumulant=return_includes_current_cumulant,
        lookahead_trials=lookahead_trials,
    )


def _rafiee_patterning(where: str, *, task: str, isi_range, gamma, num_cs, num_activation_patterns,
                       num_distractors, noise, iti_range, return_includes_current_cumulant,
                       lookahead_trials) -> ConditioningStream:
    num_cs = _check_int(where, "num_cs", num_cs, minimum=2)
    num_patterns_available = math.comb(num_cs, num_cs // 2)
    num_activation_patterns = _check_int(
        where, "num_activation_patterns", num_activation_patterns, minimum=1, maximum=num_patterns_available
    )
    noise = _check_probability(where, "noise", noise)
    reference_probability = (2**num_cs * 0.5 - num_activation_patterns) / (2**num_cs - num_activation_patterns)
    stream = ConditioningStream(
        task=task,
        variant="rafiee",
        num_cs=num_cs,
        num_distractors=_check_int(where, "num_distractors", num_distractors, minimum=0),
        cs_steps=4,
        us_steps=2,
        distractor_steps=4,
        isi_range=isi_range,
        iti_range=_check_range(where, "iti_range", iti_range, minimum=4),
        trial_extra_steps=0,
        gamma=gamma,
        pattern_rule="reference_mixture",
        num_reinforced_patterns=num_activation_patterns,
        reference_pattern_probability=float(reference_probability),
        us_noise=noise,
        distractor_rule="pattern_at_trial_start",
        us_first=True,
        return_includes_current_cumulant=_check_bool(
            where, "return_includes_current_cumulant", return_includes_current_cumulant
        ),
        lookahead_trials=0,
    )
    return _with_lookahead(where, stream, lookahead_trials)


ANIMAL_BUILDERS = {
    ("trace_patterning", "paper"): paper_trace_patterning,
    ("trace_patterning", "rafiee"): rafiee_trace_patterning,
    ("trace_conditioning", "rafiee"): rafiee_trace_conditioning,
    ("noisy_patterning", "rafiee"): rafiee_noisy_patterning,
}
DEFAULT_VARIANT = {"trace_patterning": "paper", "trace_conditioning": "rafiee", "noisy_patterning": "rafiee"}


def make_animal_stream(task: str, variant: str | None = None, **params: Any) -> ConditioningStream:
    """The device stream for an animal-learning task; ValueError names any bad task/variant/param."""
    if task not in DEFAULT_VARIANT:
        raise ValueError(f"unknown animal-learning task {task!r}; allowed: {sorted(DEFAULT_VARIANT)}")
    variant = DEFAULT_VARIANT[task] if variant is None else variant
    variants = sorted(v for t, v in ANIMAL_BUILDERS if t == task)
    if variant not in variants:
        raise ValueError(f"task {task!r}: unknown variant {variant!r}; allowed: {variants}")
    builder = ANIMAL_BUILDERS[task, variant]
    allowed = list(inspect.signature(builder).parameters)
    for name in params:
        if name not in allowed:
            raise ValueError(
                f"task {task!r} (variant {variant!r}): unknown parameter {name!r}; allowed: {allowed}"
            )
    return builder(**params)


# ---- validation -------------------------------------------------------------------------------


def _with_lookahead(where: str, stream: ConditioningStream, lookahead_trials: int | None) -> ConditioningStream:
    """Fill in `lookahead_trials`: given, or the fewest that bound the omitted tail of the return."""
    if lookahead_trials is None:
        lookahead_trials = automatic_lookahead_trials(stream)
        if lookahead_trials > MAX_LOOKAHEAD_TRIALS:
            raise ValueError(
                f"{where}: gamma={stream.gamma} needs {lookahead_trials} trials of lookahead for an exact "
                f"true return (limit {MAX_LOOKAHEAD_TRIALS}); lower gamma or pass lookahead_trials"
            )
    lookahead_trials = _check_int(where, "lookahead_trials", lookahead_trials, minimum=0,
                                  maximum=MAX_LOOKAHEAD_TRIALS)
    return dataclasses.replace(stream, lookahead_trials=lookahead_trials)


def automatic_lookahead_trials(stream: ConditioningStream) -> int:
    """Fewest K with us_steps * gamma^(K L + isi_min) / (1 - gamma^L) <= RETURN_TAIL_TOLERANCE.

    L is the shortest trial; the bound covers every US of the trials after the next K.
    """
    if stream.gamma == 0.0:
        return 0
    shortest_trial = stream.isi_range[0] + stream.iti_range[0] + stream.trial_extra_steps
    per_trial = stream.gamma**shortest_trial
    scale = stream.us_steps * stream.gamma ** stream.isi_range[0] / (1.0 - per_trial)
    if scale <= RETURN_TAIL_TOLERANCE:
        return 0
    return math.ceil(math.log(RETURN_TAIL_TOLERANCE / scale) / math.log(per_trial))


def _check_int(where: str, name: str, value: Any, *, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{where}: parameter {name!r} must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{where}: parameter {name!r} must be {bounds}, got {value!r}")
    return int(value)


def _check_range(where: str, name: str, value: Any, *, minimum: int) -> tuple[int, int]:
    if not isinstance(value, tuple | list) or len(value) != 2:
        raise ValueError(f"{where}: parameter {name!r} must be (low, high) inclusive, got {value!r}")
    low = _check_int(where, name, value[0], minimum=minimum)
    high = _check_int(where, name, value[1], minimum=low)
    return low, high


def _check_gamma(where: str, gamma: Any) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, int | float) or not 0.0 <= gamma < 1.0:
        raise ValueError(f"{where}: parameter 'gamma' must be a number in [0, 1), got {gamma!r}")
    return float(gamma)


def _check_probability(where: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{where}: parameter {name!r} must be a probability in [0, 1], got {value!r}")
    return float(value)


def _check_bool(where: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{where}: parameter {name!r} must be True or False, got {value!r}")
    return value


def _rafiee_gamma(where: str, isi: int, gamma: float | None) -> float:
    if gamma is None:
        if isi not in RAFIEE_GAMMA_BY_ISI:
            raise ValueError(
                f"{where}: no reference gamma for isi={isi} (the reference's table covers "
                f"{sorted(RAFIEE_GAMMA_BY_ISI)}); pass parameter 'gamma'"
            )
        return RAFIEE_GAMMA_BY_ISI[isi]
    return _check_gamma(where, gamma)
