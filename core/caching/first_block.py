"""First-block-residual caching for DiTs (ParaAttention's First Block Cache, as diffusers' FirstBlockCache; with
TeaCache's accumulated change, Liu et al. 2024): every step runs the first block; the relative change of its
residual since the previous step is added up, and while the sum stays under `threshold` the remaining blocks are
skipped and the residual they added at the last full step is added instead. A full step resets the sum.

Options beyond that rule (defaults keep it):
- rule="reference": diffusers' FirstBlockCache rule instead -- the change is measured against the residual of the
  last full step, not summed step to step, and a step skips while change <= threshold (bit-identical to
  diffusers.hooks.FirstBlockCacheConfig on the models it runs on; tests/test_caching_core.py).
- max_skip: at most this many consecutive skipped steps (MagCache's K, Ma et al. 2025).
- order=1: on a skipped step, extrapolate the skipped blocks' residual linearly in the step index from the last two
  full steps (a first-order Taylor forecast, as TaylorSeer (Liu et al. 2025) does for features) instead of reusing
  the last one.
- schedule: a CacheSchedule (e.g. searched offline by caching.search.search_schedule, saved as JSON that pipeline and
  node both read) decides instead of the threshold: a step the schedule marks computes in full, any other step
  skips every block, the first one included, and adds the whole stack's residual from the last full step (as
  MagCache skips: no first block to run when the decision is known in advance).

One implementation for both surfaces: diffusers' SD3 / Flux transformers (pipelines/caching.py) and ComfyUI's SD3
MMDiT (nodes/caching.py); layouts.BLOCK_IO says in which order each layout's blocks take (hidden, encoder)."""

from __future__ import annotations

import math

from ...errors import InvalidParameterError
from .layouts import block_io, dit_block_paths
from .patch import ModelPatch, resolve
from .schedule import CacheSchedule
from .state import StepClock


def _io(io, args, kwargs):
    """(hidden, encoder) of a transformer block call. io = a layouts.BLOCK_IO entry: diffusers' joint blocks take
    (hidden_states, encoder_hidden_states) (often as keywords), ComfyUI's JointBlock takes (context, x)."""
    h_pos, h_key, e_pos, e_key = io
    hid = kwargs[h_key] if h_key in kwargs else args[h_pos]
    enc = kwargs[e_key] if e_key in kwargs else (args[e_pos] if len(args) > e_pos else None)
    return hid, enc


def _split(out):
    """A block's output as (encoder, hidden); diffusers' SD3 / Flux blocks return (encoder, hidden)."""
    return (out[0], out[1]) if isinstance(out, tuple) else (None, out)


def _add(a, b):
    return None if a is None or b is None else a + b


def _sub(a, b):
    return None if a is None or b is None else a - b


class FirstBlockCache:
    """cache(forward, t, *args, stream=..., **kwargs): one transformer call with first-block gating.

    threshold in [0, 1]: 0 never skips; 0.05-0.2 is the range diffusers and TeaCache use. `warmup` first steps
    always compute (the residual's change is meaningless before the layout forms)."""

    RULES = ("accumulated", "reference")

    def __init__(self, model, threshold: float, clock: StepClock | None = None, blocks=None, warmup: int = 1,
                 rule: str = "accumulated", max_skip: int | None = None, order: int = 0, schedule=None):
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) \
                or not 0 <= threshold <= 1:
            raise InvalidParameterError(f"threshold={threshold!r}: need a number in [0, 1] (accumulated relative "
                                        "change of the first block's residual; 0 = never skip)")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise InvalidParameterError(f"warmup={warmup!r}: need an integer >= 1 (first steps always computed)")
        if rule not in self.RULES:
            raise InvalidParameterError(f"rule={rule!r}: need one of {', '.join(self.RULES)}")
        if max_skip is not None and (isinstance(max_skip, bool) or not isinstance(max_skip, int) or max_skip < 1):
            raise InvalidParameterError(f"max_skip={max_skip!r}: need an integer >= 1 (consecutive skipped steps) "
                                        "or None (no cap)")
        if isinstance(order, bool) or order not in (0, 1):
            raise InvalidParameterError(f"order={order!r}: need 0 (reuse the last residual) or 1 (extrapolate "
                                        "linearly from the last two full steps)")
        paths = list(blocks) if blocks is not None else dit_block_paths(model)
        if len(paths) < 2:
            raise InvalidParameterError(f"{type(model).__name__} has {len(paths)} transformer block(s); first-block "
                                        "caching needs at least 2")
        resolve(model, paths)
        self.schedule = None if schedule is None else CacheSchedule.parse(schedule)
        self.io = block_io(model)
        self.model, self.paths, self.threshold, self.warmup = model, paths, float(threshold), warmup
        self.rule, self.max_skip, self.order = rule, max_skip, order
        self.clock = clock or StepClock()
        self.states: dict = {}
        self._run = None
        self.full_calls = self.reused_calls = 0
        self.decisions: list[tuple[int, bool]] = []   # (step, skipped) of each call in the current run

    def __call__(self, forward, t, *args, stream=None, step: int | None = None, **kwargs):
        step = self.clock.observe(t) if step is None else self.clock.set(step)
        if self._run != self.clock.run:
            self.states.clear()
            self.decisions = []
            self._run = self.clock.run
        x = args[0] if args else next(iter(kwargs.values()))
        st = self.states.setdefault((stream, tuple(getattr(x, "shape", ()))), {"acc": 0.0, "run": 0})
        call = {"skip": False}
        if self.schedule is not None:                         # decided in advance: the head need not run
            call["skip"] = not self.schedule(step) and "tail_r" in st and step >= self.warmup \
                and (self.max_skip is None or st["run"] < self.max_skip)
            call["tuple"] = st.get("tuple", True)
        head, *middle, tail = self.paths
        wrappers = {head: self._head(st, call, step), tail: self._tail(st, call, step)}
        wrappers.update({p: self._middle(call) for p in middle})
        with ModelPatch(self.model, wrappers):
            out = forward(*args, **kwargs)
        if call["skip"]:
            self.reused_calls += 1
        else:
            self.full_calls += 1
        self.decisions.append((step, call["skip"]))
        return out

    def _head(self, st, call, step):
        def run(original, *args, **kwargs):
            hid_in, enc_in = _io(self.io, args, kwargs)
            if self.schedule is not None:
                return self._head_scheduled(st, call, original, enc_in, hid_in, args, kwargs)
            out = original(*args, **kwargs)
            enc, hid = _split(out)
            r = hid - hid_in                                     # (B, N, D) the first block's residual
            prev = st.get("r")
            if prev is not None and prev.shape == r.shape and step >= self.warmup and "tail_r" in st \
                    and (self.max_skip is None or st["run"] < self.max_skip):
                change = float((r - prev).abs().mean() / prev.abs().mean().clamp_min(1e-12))
                if self.rule == "reference":                     # diffusers: vs the last full step, no sum
                    call["skip"] = not change > self.threshold
                else:
                    st["acc"] += change
                    call["skip"] = st["acc"] < self.threshold
            if not call["skip"]:
                st["acc"], st["run"] = 0.0, 0
            else:
                st["run"] += 1
            if self.rule == "accumulated" or not call["skip"]:
                st["r"] = r
            st["head"] = (enc, hid)
            call["tuple"] = isinstance(out, tuple)
            return out
        return run

    def _head_scheduled(self, st, call, original, enc_in, hid_in, args, kwargs):
        """Schedule mode: the residual is measured from the head's input, so a skipped step passes its input through
        every block and the tail adds the whole stack's residual."""
        st["head"] = (enc_in, hid_in)
        if call["skip"]:
            st["run"] += 1
            return (enc_in, hid_in) if call["tuple"] else hid_in
        out = original(*args, **kwargs)
        st["run"], st["tuple"] = 0, isinstance(out, tuple)
        call["tuple"] = st["tuple"]
        return out

    def _middle(self, call):
        def run(original, *args, **kwargs):
            if not call["skip"]:
                return original(*args, **kwargs)
            hid, enc = _io(self.io, args, kwargs)
            return (enc, hid) if call["tuple"] else hid
        return run

    def _tail(self, st, call, step):
        def run(original, *args, **kwargs):
            enc_h, hid_h = st["head"]
            if call["skip"]:
                r_enc, r_hid, is_tuple = self._forecast(st, step)
                hid = hid_h + r_hid
                return (_add(enc_h, r_enc), hid) if is_tuple else hid
            out = original(*args, **kwargs)
            enc, hid = _split(out)
            if self.order and "tail_r" in st:
                st["tail_prev"] = st["tail_r"], st["tail_step"]
            st["tail_r"], st["tail_step"] = (_sub(enc, enc_h), hid - hid_h, isinstance(out, tuple)), step
            return out
        return run

    def _forecast(self, st, step):
        """The skipped blocks' residual at `step`: the last full step's (order 0), or the line through the last two
        full steps' residuals (order 1; order 0 until two full steps exist)."""
        r_enc, r_hid, is_tuple = st["tail_r"]
        if not self.order or "tail_prev" not in st:
            return r_enc, r_hid, is_tuple
        (p_enc, p_hid, _), p_step = st["tail_prev"]
        w = (step - st["tail_step"]) / max(st["tail_step"] - p_step, 1)
        hid = r_hid + w * (r_hid - p_hid)
        enc = None if r_enc is None or p_enc is None or p_enc.shape != r_enc.shape else r_enc + w * (r_enc - p_enc)
        return enc, hid, is_tuple

    def reset(self) -> None:
        self.clock.reset()
        self.states.clear()

