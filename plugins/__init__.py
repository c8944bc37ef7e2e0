"""The plugin registry: one module per collection, keyed by its NSID."""

from __future__ import annotations

from indexer.plugin import Plugin
from plugins.block import BlockPlugin
from plugins.feed_generator import FeedGeneratorPlugin
from plugins.follow import FollowPlugin
from plugins.labeler import LabelerPlugin
from plugins.like import LikePlugin
from plugins.list import ListPlugin
from plugins.listblock import ListBlockPlugin
from plugins.listitem import ListItemPlugin
from plugins.post import PostPlugin
from plugins.postgate import PostgatePlugin
from plugins.profile import ProfilePlugin
from plugins.repost import RepostPlugin
from plugins.starterpack import StarterPackPlugin
from plugins.threadgate import ThreadgatePlugin
from plugins.verification import VerificationPlugin


def registry() -> dict[str, Plugin]:
    """Every plugin by collection; checked so that a plugin's key and its collection agree."""
    plugins: list[Plugin] = [
        PostPlugin(),
        LikePlugin(),
        RepostPlugin(),
        FollowPlugin(),
        BlockPlugin(),
        ProfilePlugin(),
        ListPlugin(),
        ListItemPlugin(),
        ListBlockPlugin(),
        FeedGeneratorPlugin(),
        ThreadgatePlugin(),
        PostgatePlugin(),
        StarterPackPlugin(),
        LabelerPlugin(),
        VerificationPlugin(),
    ]
    found = {p.collection: p for p in plugins}
    if len(found) != len(plugins):
        raise RuntimeError("two plugins claim the same collection")
    return found
