"""Routers: which replica of a cluster gets each arriving request.

Every router sees the replicas at the request's arrival moment (the cluster has run each of them up to
it) and returns a replica index. Load is the number of outstanding requests of a replica: arrived or
queued and not finished (running + waiting + added but not yet admitted).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import xxhash

ROUTERS = ("round-robin", "least-outstanding", "prefix-affinity")
DEFAULT_ROUTER = "least-outstanding"
"""The router `twinfer simulate --replicas` and `twinfer plan` use unless told: each request to the replica with
the fewest outstanding, as a load balancer in front of vLLM replicas would."""


def outstanding_requests(engine) -> int:
    """Requests a replica has taken and not finished: running, waiting, or added but not arrived yet."""
    scheduler = engine.scheduler
    return len(scheduler.running) + len(scheduler.waiting) + engine.num_pending


@dataclass(frozen=True, slots=True)
class RoutedRequest:
    """What a router may look at: the request's id, arrival time and prompt tokens."""

    request_id: str
    arrival_time: float
    prompt_token_ids: Sequence[int]


class RoundRobinRouter:
    """Replica 0, 1, ..., N-1, 0, ... in arrival order, whatever their load."""

    name = "round-robin"

    def __init__(self) -> None:
        self._next = 0

    def route(self, request: RoutedRequest, replicas: Sequence) -> int:
        """The next replica in turn."""
        index = self._next % len(replicas)
        self._next = index + 1
        return index


class LeastOutstandingRouter:
    """The replica with the fewest outstanding requests at the arrival moment; ties go to the lowest index."""

    name = "least-outstanding"

    def route(self, request: RoutedRequest, replicas: Sequence) -> int:
        """The least-loaded replica."""
        loads = [outstanding_requests(engine) for engine in replicas]
        return loads.index(min(loads))


class PrefixAffinityRouter:
    """Requests whose prompts start alike go to the same replica, so its prefix cache serves them.

    The rule: the home replica of a request is xxhash64 of its first `prefix_tokens` prompt tokens (the
    first KV block by default; the whole prompt if shorter) modulo the replica count, so requests sharing a
    system prompt or a conversation's history share a home. The request goes home unless home is much
    busier than the least-loaded replica, meaning home's outstanding requests exceed BOTH
    `max_extra` more than the least-loaded replica's AND `max_ratio` times them; then it goes to the
    least-loaded replica (ties to the lowest index), trading a cache hit for queueing time.
    """

    name = "prefix-affinity"

    def __init__(self, prefix_tokens: int = 16, max_extra: int = 8, max_ratio: float = 1.5) -> None:
        if prefix_tokens < 1:
            raise ValueError(f"prefix-affinity router: prefix_tokens must be >= 1, got {prefix_tokens}")
        if max_extra < 0 or max_ratio < 1:
            raise ValueError(
                f"prefix-affinity router: need max_extra >= 0 and max_ratio >= 1, got {max_extra}, {max_ratio}"
            )
        self.prefix_tokens = prefix_tokens
        self.max_extra = max_extra
        self.max_ratio = max_ratio
        self.num_affinity = 0
        """Requests sent to their home replica."""
        self.num_fallback = 0
        """Requests sent elsewhere because home was overloaded."""

    def home(self, request: RoutedRequest, num_replicas: int) -> int:
        """The replica the request's leading tokens hash to."""
        head = np.asarray(request.prompt_token_ids[: self.prefix_tokens], dtype=np.int64)
        return xxhash.xxh64_intdigest(head.tobytes()) % num_replicas

    def route(self, request: RoutedRequest, replicas: Sequence) -> int:
        """Home, unless home is overloaded compared with the least-loaded replica."""
        home = self.home(request, len(replicas))
        loads = [outstanding_requests(engine) for engine in replicas]
        least = min(loads)
        if loads[home] > least + self.max_extra and loads[home] > self.max_ratio * least:
            self.num_fallback += 1
            return loads.index(least)
        self.num_affinity += 1
        return home


def make_router(name: str, block_size: int = 16):
    """A fresh router by its CLI name (round-robin, least-outstanding, prefix-affinity)."""
    if name == "round-robin":
        return RoundRobinRouter()
    if name == "least-outstanding":
        return LeastOutstandingRouter()
    if name == "prefix-affinity":
        return PrefixAffinityRouter(prefix_tokens=block_size)
    raise ValueError(f"unknown router {name!r}: expected one of {', '.join(ROUTERS)}")
