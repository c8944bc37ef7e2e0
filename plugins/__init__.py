"""The plugin registry: one module per collection, keyed by its NSID."""

from __future__ import annotations

from indexer.plugin import Plugin
from plugins.block import BlockPlugin
from plugins.follow import FollowPlugin
from plugins.like import LikePlugin
from plugins.post import PostPlugin
from plugins.profile import ProfilePlugin
from plugins.repost import RepostPlugin


def registry() -> dict[str, Plugin]:
    """Every plugin by collection; checked so that a plugin's key and its collection agree."""
    plugins: list[Plugin] = [
        PostPlugin(),
        LikePlugin(),
        RepostPlugin(),
        FollowPlugin(),
        BlockPlugin(),
        ProfilePlugin(),
    ]
    found = {p.collection: p for p in plugins}
    if len(found) != len(plugins):
        raise RuntimeError("two plugins claim the same collection")
    return found
