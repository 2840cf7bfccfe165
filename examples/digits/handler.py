"""The digits example: the ready-made image handler, 32×32 crops (settings in the archiver config)."""

from handlers import ImageClassifierHandler


class DigitsHandler(ImageClassifierHandler):
    """Recognises a handwritten digit in a PNG/JPEG; the answer's top label is the digit."""
