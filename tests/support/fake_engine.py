"""A scripted GenerationEngine for the scheduler's tests (no model): request = {"n": tokens to generate, and
optionally "bad": ValueError on add, "crash": RuntimeError on add, "boom_at": the step that fails}. It records
what was added and cancelled and the size of every add and step."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Ev:                      # the fields of videochat.runtime.types.TokenEvent the scheduler reads
    token_id: int | None
    text: str
    finished: bool
    finish_reason: str | None = None
    prompt_tokens: int = 7
    completion_tokens: int = 0


class FakeEngine:
    instances = 0              # engines made (the scheduler makes a new one after a failed step)

    def __init__(self):
        FakeEngine.instances += 1
        self.active: dict[int, list] = {}
        self.next_handle = 0
        self.added: list[dict] = []
        self.cancelled: list[int] = []
        self.add_calls: list[int] = []
        self.step_sizes: list[int] = []

    def add(self, requests):
        self.add_calls.append(len(requests))
        for r in requests:
            if r.get("bad"):
                raise ValueError("prompt too long")
            if r.get("crash"):
                raise RuntimeError("out of memory")
        handles = []
        for r in requests:
            self.added.append(r)
            self.active[self.next_handle] = [r, 0]
            handles.append(self.next_handle)
            self.next_handle += 1
        return handles

    def step(self):
        self.step_sizes.append(len(self.active))
        out = []
        for h, state in list(self.active.items()):
            r, done = state
            if r.get("boom_at") == done + 1:
                raise RuntimeError("kernel failed")
            state[1] = done = done + 1
            finished = done >= r["n"]
            out.append((h, Ev(token_id=100 + done, text=f"w{done} ", finished=finished,
                              finish_reason="length" if finished else None, completion_tokens=done)))
            if finished:
                del self.active[h]
        return out

    def cancel(self, handle):
        self.cancelled.append(handle)
        r, done = self.active.pop(handle)
        return Ev(token_id=None, text="", finished=True, finish_reason="cancelled", completion_tokens=done)

    @property
    def num_active(self):
        return len(self.active)
