"""Subscriptions as a topic trie: the cost of routing grows with the matching subscribers, not the filters.

Stock amqtt scanned every filter of every client for each PUBLISH (1,000 devices each holding `.../cmd/#`
meant 1,000 string splits per message). Here a topic walks at most one path per level plus the `+` and `#`
branches, and the answer per topic is cached until the subscriptions change.
"""

from __future__ import annotations

from typing import Generic, TypeVar

__all__ = ["Trie"]

K = TypeVar("K")

_CACHE_MAX = 20_000


class _Node(Generic[K]):
    __slots__ = ("children", "subs")

    def __init__(self) -> None:
        self.children: dict[str, _Node[K]] = {}
        self.subs: dict[K, int] = {}


class Trie(Generic[K]):
    def __init__(self) -> None:
        self._root: _Node[K] = _Node()
        self._cache: dict[str, dict[K, int]] = {}
        self.count = 0

    def add(self, topic_filter: str, key: K, qos: int) -> None:
        """Subscribe `key`; a second subscription to the same filter replaces the first (section 3.8.4)."""
        node = self._root
        for level in topic_filter.split("/"):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _Node()
            node = child
        if key not in node.subs:
            self.count += 1
        node.subs[key] = qos
        self._cache.clear()

    def remove(self, topic_filter: str, key: K) -> bool:
        path: list[tuple[_Node[K], str]] = []
        node = self._root
        for level in topic_filter.split("/"):
            child = node.children.get(level)
            if child is None:
                return False
            path.append((node, level))
            node = child
        if node.subs.pop(key, None) is None:
            return False
        self.count -= 1
        self._cache.clear()
        # prune empty branches so dead filters cost nothing (stock kept them and scanned them forever)
        for parent, level in reversed(path):
            child = parent.children[level]
            if child.subs or child.children:
                break
            del parent.children[level]
        return True

    def match(self, topic: str) -> dict[K, int]:
        """Every subscriber of `topic` with the highest QoS among its matching filters (section 3.3.5)."""
        hit = self._cache.get(topic)
        if hit is not None:
            return hit
        out: dict[K, int] = {}
        levels = topic.split("/")
        # section 4.7.2: wildcards at the first level do not match topics starting with `$`
        self._walk(self._root, levels, 0, out, topic.startswith("$"))
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[topic] = out
        return out

    def _walk(self, node: _Node[K], levels: list[str], i: int, out: dict[K, int], dollar: bool) -> None:
        children = node.children
        wild = not (dollar and i == 0)
        if wild:
            multi = children.get("#")
            if multi is not None:
                _merge(out, multi.subs)
        if i == len(levels):
            _merge(out, node.subs)
            return
        exact = children.get(levels[i])
        if exact is not None:
            self._walk(exact, levels, i + 1, out, dollar)
        if wild:
            single = children.get("+")
            if single is not None:
                self._walk(single, levels, i + 1, out, dollar)


def _merge(out: dict[K, int], subs: dict[K, int]) -> None:
    for key, qos in subs.items():
        if out.get(key, -1) < qos:
            out[key] = qos
