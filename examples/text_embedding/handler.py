"""The text embedding example: the ready-made sentence-embedding handler over all-MiniLM-L6-v2."""

from handlers import SentenceEmbeddingHandler


class MiniLMHandler(SentenceEmbeddingHandler):
    """384-dimensional unit vectors; cosine similarity is their dot product."""
