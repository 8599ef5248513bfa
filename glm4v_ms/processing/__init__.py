"""Inputs -> model tensors: media sources (paths, URLs, data URIs, PDF), image and video preprocessing, the processor
(chat template, placeholder expansion) and the offline test tokenizer. numpy + PIL only; imports nothing above it."""
