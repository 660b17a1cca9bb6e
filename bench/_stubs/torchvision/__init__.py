"""Import stub for bench.peers only: mosaicml-streaming imports torchvision in ``streaming.vision`` at package import,
and no torchvision wheel matches this CPU torch build. The peer benchmark uses none of it."""
