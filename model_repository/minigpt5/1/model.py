"""Triton entry point of `minigpt5`; the logic lives in minigpt5/serving/minigpt5_model.py."""

from minigpt5.serving.metrics import PublicModelMetrics
from minigpt5.serving.minigpt5_model import MiniGPT5Model


class TritonPythonModel:
    def initialize(self, args):
        self.model = MiniGPT5Model(args, metrics=PublicModelMetrics())

    def execute(self, requests):
        return self.model.execute(requests)

    def finalize(self):
        self.model.finalize()
