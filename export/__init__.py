"""Model side of the station: train a Siamese trunk with torch, export it to a
self-describing (int8) ONNX file that station.core.embedder.Embedder loads.

Only `station train` and `station export` import this package: it needs the
`train` extra (torch, onnx); the line PC never installs it.
"""
