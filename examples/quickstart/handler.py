"""The quickstart handler: a request {"id": ..., "x": [4 numbers]} gets {"id": ..., "y": [...]}.

The model (model.py) and its weights come from the archive; the base handler loads them,
preprocesses requests in parallel and runs micro-batches on the model.
"""

import torch

from handlers import BadRequest, MicroBatchHandler


class QuickstartHandler(MicroBatchHandler):
    def preprocess_one(self, request):
        payload = request.json()
        if not isinstance(payload, dict) or "x" not in payload:
            raise BadRequest('expected a JSON object {"id": ..., "x": [4 numbers]}')
        if not _numbers(payload["x"], 4):
            raise BadRequest(f'"x" must be a list of 4 numbers, got {payload["x"]!r:.80}')
        try:
            x = torch.as_tensor(payload["x"], dtype=torch.float32)
        except OverflowError:  # a JSON integer past float range, e.g. 1 followed by 400 zeros
            raise BadRequest(f'"x" holds a number too large for float32, got {payload["x"]!r:.80}') from None
        return {"id": payload.get("id"), "x": x}

    def collate(self, items):
        return super().collate([item["x"] for item in items])

    def postprocess_one(self, output, item):
        return {"id": item["id"], "y": output.tolist()}


def _numbers(value, length):
    return (
        isinstance(value, list)
        and len(value) == length
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    )
