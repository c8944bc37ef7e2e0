"""app.bsky.feed.threadgate: `thread_gate`, and `post.hasThreadGate` of the gated post."""

from __future__ import annotations

from plugins._gate import GatePlugin


class ThreadgatePlugin(GatePlugin):
    collection = "app.bsky.feed.threadgate"
    table = "thread_gate"
    flag = "hasThreadGate"
