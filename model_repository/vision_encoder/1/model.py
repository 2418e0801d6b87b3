"""Triton entry point of `vision_encoder`; the logic lives in minigpt5/serving/vision_encoder_model.py."""

from minigpt5.serving.vision_encoder_model import VisionEncoder


class TritonPythonModel:
    def initialize(self, args):
        self.model = VisionEncoder(args)

    def execute(self, requests):
        return self.model.execute(requests)
