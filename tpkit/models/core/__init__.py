"""What every model family shares: attach/detach, masks, compaction, the layer loop, stage-2 glue,
token accounting and generation. A family plugs in through :class:`tpkit.models.core.family.Family`."""
