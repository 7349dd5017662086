"""The GPT itself: the decoder stack, its loss and per-token log-probabilities, the stacked (scanned) layer layout."""
