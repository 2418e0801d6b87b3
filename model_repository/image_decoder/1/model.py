"""Triton entry point of `image_decoder`; the logic lives in minigpt5/serving/image_decoder_model.py."""

from minigpt5.serving.image_decoder_model import ImageDecoderModel
from minigpt5.serving.metrics import ImageMetrics


class TritonPythonModel:
    def initialize(self, args):
        self.model = ImageDecoderModel(args, metrics=ImageMetrics())

    def execute(self, requests):
        return self.model.execute(requests)
