"""The tabular example: the ready-made tensor handler (4 float32 features per request), with the
answer named after the iris species."""

import json
import os

from handlers import TensorHandler


class IrisHandler(TensorHandler):
    """``[5.1, 3.5, 1.4, 0.2]`` → ``{"species": "setosa", "probabilities": {...}}``."""

    def setup(self, model_dir):
        super().setup(model_dir)
        with open(os.path.join(model_dir, "index_to_name.json")) as f:
            self.species = {int(k): v for k, v in json.load(f).items()}

    def postprocess_one(self, output, item):
        probabilities = output.tolist()
        best = max(range(len(probabilities)), key=probabilities.__getitem__)
        return {
            "species": self.species[best],
            "probabilities": {self.species[i]: round(p, 6) for i, p in enumerate(probabilities)},
        }
