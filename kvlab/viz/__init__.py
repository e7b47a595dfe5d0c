"""kvlab.viz: what people look at. plots (plotly figures), widgets (notebook explorers), report
(`kvlab report`'s HTML), blocks_view (a block's bytes as named fields)."""
