"""app.bsky.graph.block: the `actor_block` table (no counters)."""

from __future__ import annotations

from typing import Any

import msgspec

from indexer.plugin import Op
from plugins._unique import UniquePlugin, UniqueTable
from plugins.follow import GRAPH_COLUMNS, GraphRecord, graph_rows


class BlockPlugin(UniquePlugin):
    collection = "app.bsky.graph.block"
    table = UniqueTable(
        "actor_block", GRAPH_COLUMNS, ("varchar",) * 6, key=("creator", "subjectDid"),
        returning=(),
    )  # fmt: skip
    decode = msgspec.json.Decoder(GraphRecord).decode

    def rows(self, ops: list[Op]) -> list[tuple[Any, ...]]:
        return graph_rows(ops)
