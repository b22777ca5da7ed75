"""Real data, read from local files or streams: one tar reader and what is built on it, image folders, HF datasets.

- :mod:`.tar`: the one webdataset tar reader (shard lists, members grouped into samples, shard faults counted);
- :mod:`.shards`: the training stream of image-caption samples over shards (split, shuffle, caption choice, resume);
- :mod:`.folders`: image folders, flat or one sub-folder per class;
- :mod:`.captioned`: image-caption pairs from a sidecar folder or a CSV / JSONL index;
- :mod:`.hf`: image-caption pairs from local Hugging Face ``datasets`` files.
"""
