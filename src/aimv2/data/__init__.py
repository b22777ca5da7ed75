"""Data: image transforms (uint8 out), the tokenizer, fault counting, real sources (:mod:`.sources`), class names,
and the built-in synthetic data (:mod:`.synthetic`)."""
