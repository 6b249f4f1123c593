"""Pure ACL decisions: may this principal publish, subscribe to or receive this topic?

Devices publish only under `{root}/{site}/{room}/{type}/{device_id}/` (not into their own `cmd/`) and
subscribe only to their own `cmd/#`. Integrations and anonymous clients get the patterns they were given;
deny patterns win over allow patterns.
"""

from __future__ import annotations

from gateway.models import Principal
from gateway.topics import device_prefix, filter_covers, filter_matches

__all__ = ["explain", "may_publish", "may_receive", "may_subscribe"]


def _prefix(principal: Principal, root: str) -> str:
    d = principal.device
    assert d is not None
    return device_prefix(root, d.site, d.room, d.type, d.device_id)


def may_publish(principal: Principal, topic: str, root: str) -> bool:
    if principal.kind == "device":
        prefix = _prefix(principal, root)
        action = topic[len(prefix) :]
        return topic.startswith(prefix) and action != "" and action != "cmd" and not action.startswith("cmd/")
    if any(filter_matches(p, topic) for p in principal.deny):
        return False
    return any(filter_matches(p, topic) for p in principal.write)


def may_subscribe(principal: Principal, topic_filter: str, root: str) -> bool:
    if principal.kind == "device":
        return filter_covers(_prefix(principal, root) + "cmd/#", topic_filter)
    if any(filter_covers(p, topic_filter) for p in principal.deny):
        return False
    return any(filter_covers(p, topic_filter) for p in principal.read)


def may_receive(principal: Principal, topic: str, root: str) -> bool:
    if principal.kind == "device":
        return topic.startswith(_prefix(principal, root) + "cmd/")
    if any(filter_matches(p, topic) for p in principal.deny):
        return False
    return any(filter_matches(p, topic) for p in principal.read)


def explain(principal: Principal, action: str, topic: str, root: str) -> str:
    """A sentence saying which rule decided, for logs (and later the ACL simulator)."""
    if principal.kind == "device":
        return f"device {principal.name} may publish under {_prefix(principal, root)} and read its cmd/#"
    return (
        f"{principal.kind} {principal.name}: read {list(principal.read)}, write {list(principal.write)}, "
        f"deny {list(principal.deny)}"
    )
