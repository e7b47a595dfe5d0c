"""kvlab.viz: what people look at. plots (every plotly figure, one module per subject, one palette),
widgets (the notebooks' explorers and `show`), report (`kvlab report`'s HTML) with report_tp (its
tensor-parallel section), blocks_view (a block's bytes as named fields)."""
