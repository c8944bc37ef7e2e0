"""app.bsky.feed.postgate: `post_gate`, and `post.hasPostGate` of the gated post."""

from __future__ import annotations

from plugins._gate import GatePlugin


class PostgatePlugin(GatePlugin):
    collection = "app.bsky.feed.postgate"
    table = "post_gate"
    flag = "hasPostGate"
