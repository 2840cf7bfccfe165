"""Benchmark archive handler: ours, sentence embeddings."""
from handlers import SentenceEmbeddingHandler


class OursText(SentenceEmbeddingHandler):
    pass
