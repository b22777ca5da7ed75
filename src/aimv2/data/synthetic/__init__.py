"""The built-in data: procedural scenes of coloured shapes and the text generated from them, exact by construction.

- :mod:`.vocabulary`: the names a scene is made of (colours, backgrounds, shapes, sizes);
- :mod:`.scenes`: a scene's content (:class:`~.scenes.SceneSpec`), its random sampler and its renderer;
- :mod:`.captions`: captions of a scene, true to it, in several template families;
- :mod:`.dataset`: the image-caption stream (sample ``i`` of seed ``s`` is a pure function of both);
- :mod:`.probes`: labelled probe splits (count, shape, colour) written as image folders;
- :mod:`.shards`: the stream written as webdataset shards, as img2dataset lays them out.

Each module imports only ones listed before it, so there is no cycle; text about a scene in a new form (questions,
boxes) is one more module that reads a ``SceneSpec``.
"""
