"""firehose-indexer: the Bluesky firehose, from Redis streams into the AppView schema."""

__version__ = "0.1.0"
