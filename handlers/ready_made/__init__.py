"""Ready-made handlers on the core, each with its input parser: an image classifier
(``image_classifier``, ``image_input``), tensors as JSON or ``.npy`` (``tensor``,
``tensor_input``) and text (``text``, ``text_input``). Internal: the public names are in
:mod:`handlers`."""
