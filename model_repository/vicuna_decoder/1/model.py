"""Triton entry point of `vicuna_decoder`; the logic lives in minigpt5/serving/vicuna_decoder_model.py."""

from minigpt5.serving.metrics import DecoderMetrics
from minigpt5.serving.vicuna_decoder_model import VicunaDecoderModel


class TritonPythonModel:
    def initialize(self, args):
        self.model = VicunaDecoderModel(args, metrics=DecoderMetrics())

    def execute(self, requests):
        return self.model.execute(requests)

    def finalize(self):
        self.model.finalize()
